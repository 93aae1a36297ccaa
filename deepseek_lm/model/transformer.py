"""The decoder: pre-norm blocks of MLA + (dense SwiGLU | DeepSeekMoE), the final norm and the LM head, and
the optional multi-token-prediction modules (mtp.py) that train beside it.

Parameter names follow transformers' DeepseekV3 without the leading `model.` (see `hf_names.py`); the MTP
modules' are `mtp.{k-1}.` + DeepSeek-V3's names for its layer num_hidden_layers + k - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model.block import Block
from deepseek_lm.model.layers import RMSNorm, rope_tables
from deepseek_lm.model.loss import linear_cross_entropy
from deepseek_lm.model.mla import LatentCache, make_positions, packed_positions
from deepseek_lm.model.moe import MoE, RouterStats
from deepseek_lm.model.mtp import MTPModule, mtp_objective


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None  # (B, T, V), (B, 1, V) with last_logits_only; None with targets
    loss: torch.Tensor | None = None  # mean CE over targets != -100 (chunked); None without targets
    aux_loss: torch.Tensor | None = None  # α-weighted MoE auxiliary loss summed over MoE layers
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer (MTP modules' last)
    hidden: torch.Tensor | None = (
        None  # (B, T, D) final-normed hidden states, instead of logits, with return_hidden
    )
    # with targets and MTP modules, per depth k: mean CE of the module's predictions of t(i+k+1) (chunked;
    # not in `loss`), predictions whose argmax is the target (float count, no gradient), valid targets
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    mtp_top1: list[torch.Tensor] = field(default_factory=list)
    mtp_tokens: list[torch.Tensor] = field(default_factory=list)


class DeepSeekLM(nn.Module):
    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # used by the training objective and by speculative decoding only; share embed_tokens and lm_head
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(1, config.num_nextn_predict_layers + 1))
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # (2, S, dr) cos/sin; derived from the config, so not saved (recomputed by init_weights)
        self.register_buffer("rope", rope_tables(config), persistent=False)
        self.gradient_checkpointing = False  # recompute each block in the backward (training memory)
        # built directly (not on `get_model`'s meta device, where this costs nothing), the model is still
        # initialised by the table below: the experts' 3-D weights have no default init (torch.empty)
        self.init_weights()

    # weights ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one initialisation (σ = config.initializer_range, L = num_hidden_layers):

        | tensor                                                        | init                    |
        |---------------------------------------------------------------|-------------------------|
        | embed_tokens, lm_head (untied), q/kv projections, router,      | normal(0, σ)            |
        |   gate/up projections (dense, shared, routed experts)          |                         |
        | o_proj, down projections (dense, shared, routed experts)       | normal(0, σ/√(2L))      |
        | MTP modules: eh_proj                                           | normal(0, σ)            |
        | MTP modules: their block                                       | as a main block's       |
        | RMSNorm weights (enorm, hnorm, shared_head.norm included)      | ones                    |
        | e_score_correction_bias (buffer)                               | zeros                   |
        | rope cos/sin tables (buffer)                                   | recomputed from config  |

        The projections that write into the residual stream are scaled by 1/√(2L) (GPT-2, nanoGPT): each
        block adds two branches, so this keeps the stream's variance at initialisation independent of depth.
        transformers' DeepseekV3 uses plain normal(0, σ) everywhere; parity tests load weights, so
        this choice only affects training from scratch.
        """
        if self.config.tie_word_embeddings:  # to_empty gives every module its own new tensor: tie again
            self.lm_head.weight = self.embed_tokens.weight
        std, out_std = (
            self.config.initializer_range,
            self.config.initializer_range / math.sqrt(2 * len(self.layers)),
        )
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm weights: the only 1-D parameters
                p.fill_(1.0)
            else:
                residual_out = name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
                nn.init.normal_(p, 0.0, out_std if residual_out else std)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()
        self.rope.copy_(rope_tables(self.config, self.rope.device))

    def moe_layers(self) -> list[MoE]:
        """The main blocks' MoE layers, then the MTP modules' (the order of `ModelOutput.router_stats`)."""
        return [b.mlp for b in [*self.layers, *self.mtp] if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def update_router_biases(self, counts: list[torch.Tensor]) -> None:
        """bias += γ·sign(mean(load) − load) per MoE layer, from the step's summed `RouterStats.counts`."""
        moe = self.moe_layers()
        if len(counts) != len(moe):
            raise ValueError(f"expected counts for {len(moe)} MoE layers, got {len(counts)}")
        if self.config.bias_update_speed == 0:
            return
        for layer, c in zip(moe, counts):
            layer.update_bias(c)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> LatentCache:
        """A zeroed latent cache; device and dtype default to the model's."""
        p = self.embed_tokens.weight
        return LatentCache(self.config, batch_size, max_len, device or p.device, dtype or p.dtype)

    # forward ----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        start_pos: int | torch.Tensor = 0,
        last_logits_only: bool = False,
        return_hidden: bool = False,
        doc_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T) long -> ModelOutput.

        targets (B, T): the loss is computed chunked and `logits` is None; with MTP modules also their
        per-depth losses (`mtp_losses`, ...), their aux losses in `aux_loss` and their stats last. cache: run the absorbed MLA path
        over it; row b's tokens sit at positions start_pos[b] + t (start_pos an int or (B,) long), are written
        there, and attend to cache positions j <= their own. Without a cache: naive MLA, causal over T.
        return_hidden: return the final-normed hidden states instead of logits (a caller with its own head).
        last_logits_only: logits (or hidden states) of each row's last token alone, (B, 1, ·); the cache still
        gets every token's latents.
        doc_ids (B, T): rows that pack several sequences, a new one wherever the id changes; each attends only
        within itself, from position 0 (fine-tuning on packed conversations; no cache).
        """
        B, T = input_ids.shape
        max_len = cache.max_len if cache is not None else self.rope.shape[1]
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed sequences) are for training and scoring, not with a cache")
        if doc_ids is not None:
            pos = packed_positions(self.rope, doc_ids)
        else:
            pos = make_positions(self.rope, B, T, start_pos, cache is not None, max_len)
        x = self.embed_tokens(input_ids)
        aux, stats = None, []
        for i, block in enumerate(self.layers):
            layer_cache = cache.kv[i] if cache is not None else None
            # only the last token's logits are wanted: past the last layer's latents (the cache's), no other
            # token's state is read, so its queries and FFN run for that token alone (as llama.cpp's graphs)
            last_only = last_logits_only and targets is None and i == len(self.layers) - 1
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, a, s = checkpoint(block, x, pos, layer_cache, last_only, use_reentrant=False)
            else:
                x, a, s = block(x, pos, layer_cache, last_only)
            if s is not None:
                aux = a if aux is None else aux + a
                stats.append(s)
        aux = aux if aux is not None else x.new_zeros((), dtype=torch.float32)
        if targets is not None:
            h = self.norm(x)
            out = ModelOutput(loss=linear_cross_entropy(h, self.lm_head.weight, targets), aux_loss=aux)
            out.router_stats = stats
            if self.mtp:
                mtp = mtp_objective(self, h, input_ids, targets, doc_ids)
                out.mtp_losses, out.mtp_top1, out.mtp_tokens = mtp.losses, mtp.top1, mtp.tokens
                out.router_stats = stats + mtp.router_stats
                if mtp.aux_loss is not None:
                    out.aux_loss = aux + mtp.aux_loss
            return out
        if return_hidden:
            return ModelOutput(hidden=self.norm(x), aux_loss=aux, router_stats=stats)
        return ModelOutput(logits=self.lm_head(self.norm(x)), aux_loss=aux, router_stats=stats)

    # accounting -------------------------------------------------------------------------------------------

    def param_counts(self) -> dict[str, int]:
        """total (unique parameters of the main model), activated per token (only K of E routed experts),
        embedding (input table); mtp / mtp_activated: the MTP modules' own, apart (used only by training and
        speculative decoding; they share the embedding and the head)."""
        cfg = self.config
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        # the routed experts from the config: under expert parallelism this process holds only some of them
        routed = {id(p) for moe in self.moe_layers() for p in moe.experts.parameters()}
        sizes = {"main": 0, "mtp": 0}
        for name, p in self.named_parameters():  # a tied head is listed once
            if id(p) not in routed:
                sizes["mtp" if name.startswith("mtp.") else "main"] += p.numel()
        n_moe = sum(isinstance(b.mlp, MoE) for b in self.layers)
        n_moe_mtp = sum(isinstance(m.mlp, MoE) for m in self.mtp)
        total = sizes["main"] + n_moe * cfg.n_routed_experts * per_expert
        mtp = sizes["mtp"] + n_moe_mtp * cfg.n_routed_experts * per_expert
        idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert  # per MoE layer
        return dict(
            total=total, activated=total - n_moe * idle, embedding=self.embed_tokens.weight.numel(),
            mtp=mtp, mtp_activated=mtp - n_moe_mtp * idle,
        )  # fmt: skip

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 × activated matmul weights (incl. the LM head, excluding the embedding
        lookup and norms) + 6 · L · H · (qk_head_dim + v_head_dim) · seq_len for scores and values (the PaLM
        convention: the full T×T, not halved for causality). seq_len defaults to max_position_embeddings.
        Each MTP module adds its block and eh_proj, the shared head once more and one layer's attention."""
        cfg = self.config
        seq_len = seq_len or cfg.max_position_embeddings
        counts = self.param_counts()
        vectors = sum(
            p.numel() for name, p in self.named_parameters() if p.dim() == 1 and not name.startswith("mtp.")
        )
        matmul = counts["activated"] - self.embed_tokens.weight.numel() - vectors
        if cfg.tie_word_embeddings:  # the head's matmul uses the (shared) embedding table
            matmul += self.lm_head.weight.numel()
        mtp_vectors = sum(p.numel() for p in self.mtp.parameters() if p.dim() == 1)
        matmul += counts["mtp_activated"] - mtp_vectors + len(self.mtp) * self.lm_head.weight.numel()
        layers = cfg.num_hidden_layers + len(self.mtp)
        attn = layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
        return 6 * matmul + 6 * attn


def get_model(config: DeepSeekConfig | None = None, device: torch.device | str | None = None) -> DeepSeekLM:
    """Build the model for `config` (the seed architecture by default), initialised by `init_weights`.

    Built on the meta device and materialised once on `device`, so no memory is spent on a throw-away init.
    """
    config = config or DeepSeekConfig()
    with torch.device("meta"):
        model = DeepSeekLM(config)
    model.to_empty(device=device or "cpu")
    model.init_weights()
    return model
