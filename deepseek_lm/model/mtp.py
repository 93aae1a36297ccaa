"""Multi-token prediction (DeepSeek-V3 §2.2): D modules in sequence, module k predicting the token k + 1 ahead.

Module k (1-based) at position i, for the tokens t_0 .. t_T of a window:

    h'_i  = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])     Linear 2·D -> D, no bias
    h^k   = shared_head.norm(Block(h'))                           one decoder block, causal over the window
    p(t_{i+k+1} | t_0 .. t_{i+k}) = softmax(lm_head(h^k_i))

`embed_tokens` and `lm_head` are the main model's (shared, as in the paper); h^0 is the main model's
final-normed hidden state. Depth k sees T - k positions of a T-token window (the paper's shortening). Its
cross-entropies are averaged over the depths and added to the main loss with a weight λ (`train.mtp_weight`).

How DeepSeek-V3's published MTP weights are read by the engines that serve them, which our layout follows so
that an exported model drafts there (vLLM `vllm/model_executor/models/deepseek_mtp.py`, SGLang
`python/sglang/srt/models/deepseek_nextn.py`):
- Order of the concatenation: the embedding first, then the hidden state. Both engines compute
  `eh_proj(cat([enorm(embed(token)), hnorm(previous_hidden)], -1))`. (The paper writes [h ; Emb]: the weights
  follow the engines.)
- The hidden state of depth 1 is the target model's forward output; both engines' DeepseekV2Model ends with
  `model.norm`, so it is the main model's final-normed state. The block's output (with its residual) goes
  through `shared_head.norm` and then the shared head. For a further draft step SGLang feeds the state its
  NextN model returned, which is after `shared_head.norm`; we do the same: depth k ≥ 2 takes depth k - 1's
  normed output. (vLLM's chained steps feed the state before `shared_head.norm`; it only matters for
  several modules, which DeepSeek-V3 does not ship.)
- Position 0: vLLM zeroes the module's input embedding where position == 0 (`inputs_embeds[positions == 0]
  = 0`, "not needed by MTP"); SGLang does not, and neither do we (nor does the paper's definition). Zeroing
  changes the module's input at position 0, so the draft made there and, through attention to that
  position's latent, a little of every later draft of the sequence; never the main model's output, so a
  greedy speculative output is the same either way, only the acceptance rate can move.
- Weight names: module k is `model.layers.{num_hidden_layers + k - 1}.` with `enorm`, `hnorm`, `eh_proj`,
  `shared_head.norm` and the block's own `input_layernorm`, `self_attn.*`, `post_attention_layernorm`,
  `mlp.*`; DeepSeek-V3's checkpoint also holds copies of the shared tensors there, `embed_tokens.weight`
  (vLLM loads the embedding from it) and `shared_head.head.weight` (vLLM's head), which export writes and
  import checks against the main ones (deepseek_lm/interop/hf_weights.py). The block is MoE when its layer
  index num_hidden_layers + k - 1 ≥ first_k_dense_replace: vLLM builds it as the DeepseekV2DecoderLayer of
  that index.
Our parameter names are `mtp.{k-1}.` + those names, so export is a renaming.

Legend: B rows, T positions, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model.block import Block
from deepseek_lm.model.layers import RMSNorm
from deepseek_lm.model.loss import linear_cross_entropy
from deepseek_lm.model.mla import Positions, make_positions, packed_positions
from deepseek_lm.model.moe import RouterStats


class SharedHead(nn.Module):
    """The checkpoint's `shared_head`: its norm is the module's own; its `head` is the main model's lm_head."""

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(Block):
    """Module k: a decoder block (layer index num_hidden_layers + k - 1) with its input projection and norm."""

    def __init__(self, config: DeepSeekConfig, depth: int) -> None:
        super().__init__(config, config.num_hidden_layers + depth - 1)
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, pos: Positions, cache: torch.Tensor | None = None):
        """h (B, T, D): the previous depth's normed states; emb (B, T, D): the embeddings of the tokens one
        position ahead. -> normed states (B, T, D), aux loss (or None), RouterStats (or None)."""
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))  # embedding first (see above)
        x, aux, stats = super().forward(x, pos, cache)
        return self.shared_head.norm(x), aux, stats


@dataclass
class MTPOutput:
    """Per depth k: mean cross-entropy, predictions whose argmax is the target, valid targets."""

    losses: list[torch.Tensor] = field(default_factory=list)
    top1: list[torch.Tensor] = field(default_factory=list)  # float counts, no gradient
    tokens: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None  # the modules' MoE auxiliary losses, summed
    router_stats: list[RouterStats] = field(default_factory=list)


def mtp_objective(
    model: nn.Module, h_BTD: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
) -> MTPOutput:  # fmt: skip
    """The modules' losses for a window: h_BTD the main model's final-normed states, input_ids (B, T) the
    tokens t_0 .. t_{T-1}, targets (B, T) the tokens t_1 .. t_T (-100 = ignore); doc_ids (B, T) for rows that
    pack several sequences (the model's forward)."""
    B, T, _ = h_BTD.shape
    if len(model.mtp) >= T:
        raise ValueError(f"a window of {T} tokens is too short for {len(model.mtp)} MTP depth(s)")
    out, h = MTPOutput(), h_BTD
    for k, module in enumerate(model.mtp, start=1):
        n = T - k  # positions i with both t_{i+k} (input) and t_{i+k+1} (target) in the window
        y = targets[:, k:]
        if doc_ids is None:
            pos = make_positions(model.rope, B, n, 0, False, n)
        else:  # packed: each sequence on its own, and no prediction from one sequence into the next
            pos = packed_positions(model.rope, doc_ids[:, :n])
            y = y.masked_fill(doc_ids[:, :n] != doc_ids[:, k:], -100)
        args = (h[:, :n], model.embed_tokens(input_ids[:, k:]), pos)
        if model.gradient_checkpointing and model.training and torch.is_grad_enabled():
            h, aux, stats = checkpoint(module, *args, use_reentrant=False)
        else:
            h, aux, stats = module(*args)
        loss, top1 = linear_cross_entropy(h, model.lm_head.weight, y, count_top1=True)
        out.losses.append(loss)
        out.top1.append(top1)
        out.tokens.append((y != -100).sum())
        if stats is not None:
            out.aux_loss = aux if out.aux_loss is None else out.aux_loss + aux
            out.router_stats.append(stats)
    return out
