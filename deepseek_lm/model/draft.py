"""Self-speculative decoding's steps: verification of several tokens per row, and MTP draft steps.

`SpeculativeDecoder` extends decode.py's `Decoder` (the same rearranged weights and layer code) with
- `verify`: the main model over (B, T) tokens at per-row positions, returning the final-normed states of
  every position (decode.py's `decode_states`), from which the head gives the T next-token distributions;
- `draft`: the first MTP module (mtp.py) as one more decoder layer over its own one-layer latent cache:
  eh_proj of [enorm(Emb(token)) ; hnorm(state)], the block, shared_head.norm. Its enorm and hnorm weights are
  folded into eh_proj's two halves, as decode.py folds every norm into the product after it.

The draft cache follows positions like the main cache: at position i it holds the module's latent for the
pair (main state h_i, token t_{i+1}), the pair the module was trained on at position i. Draft steps made
ahead of the verified tokens (chained drafts, or the pairs of rejected tokens) write provisional entries at
later positions; they are hidden by the mask until the verified pairs overwrite them, so rejected drafts are
rolled back by not advancing the positions, in both caches.

Both steps are functions of tensors with static shapes, so `compile=True` runs them through torch.compile
(one graph per batch size, tokens per row and cache length), up to the head, as decode.py's step.
`batch_invariant=True` builds them as decode.py's batch-invariant decoder (every product through oneDNN,
the module's included; routing padded; the attention's values summed over fixed slices): a row's states,
logits and drafts are then bitwise its own whatever rows share the step and whatever length it attends
to, so a whole round is (what serve's speculative batching relies on).

Legend: B rows, T tokens per row, N = B·T, D hidden, V vocabulary, L cache positions attended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepseek_lm.model import onednn
from deepseek_lm.model.decode import (
    _FFN,
    Decoder,
    DecoderWeights,
    _Attention,
    _attention_weights,
    _ffn_weights,
    _head,
    _held,
    _rms_norm,
    compiled,
    decode_states,
    decoder_layer,
    dense_experts,
    step_positions,
)
from deepseek_lm.model.mtp import MTPModule
from deepseek_lm.model.transformer import DeepSeekLM


@dataclass
class DraftWeights:
    """An MTP module rearranged like a decoder layer."""

    w_e: torch.Tensor  # (D, D): eh_proj's embedding half with enorm's weight folded in, transposed
    w_h: torch.Tensor  # (D, D): its hidden-state half with hnorm's weight folded in
    attn: _Attention
    ffn: _FFN
    norm: torch.Tensor  # (D,) shared_head.norm


def _draft_weights(
    module: MTPModule, dense: bool, pack_rows: int | None, batch_invariant: bool
) -> DraftWeights:
    """pack_rows: the block's SwiGLU products through oneDNN for that many rows, as decode.py's layers'; and
    every other product too when `batch_invariant`."""
    D = module.enorm.weight.shape[0]
    w = module.eh_proj.weight  # (D, 2D): [embedding half | hidden half], the order of the concatenation
    rows = pack_rows if batch_invariant else None
    return DraftWeights(
        w_e=_held((w[:, :D] * module.enorm.weight).t(), rows),
        w_h=_held((w[:, D:] * module.hnorm.weight).t(), rows),
        attn=_attention_weights(module.self_attn, module.input_layernorm.weight, rows),
        ffn=_ffn_weights(
            module.mlp, module.post_attention_layernorm.weight, dense, pack_rows, batch_invariant
        ),
        norm=module.shared_head.norm.weight.clone(),
    )


def draft_states(
    w: DecoderWeights,
    d: DraftWeights,
    ids_BT: torch.Tensor,
    h_BTD: torch.Tensor,
    pos_BT: torch.Tensor,
    kv: torch.Tensor,
    masked: bool,
) -> torch.Tensor:
    """The MTP module over pairs (state h, token one position ahead) at positions pos_BT, writing its latents
    into kv (B, L, r + dr) -> its normed states (B, T, D); the head of the state at i drafts t_{i+2}."""
    B, T = ids_BT.shape
    eps = w.config.rms_norm_eps
    e_ND = F.embedding(ids_BT.flatten(), w.embed)
    x = onednn.mm(_rms_norm(e_ND, None, eps), d.w_e) + onednn.mm(
        _rms_norm(h_BTD.reshape(B * T, -1), None, eps), d.w_h
    )
    x = decoder_layer(w, d.attn, d.ffn, x, step_positions(w, pos_BT, kv.shape[1], masked), kv)
    return _rms_norm(x, d.norm, eps).view(B, T, -1)


def greedy_round(
    w: DecoderWeights,
    d: DraftWeights,
    ids_BT: torch.Tensor,
    pos_BT: torch.Tensor,
    kvs: list[torch.Tensor],
    draft_kv: torch.Tensor,
    masked: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole greedy round as one function (one graph when compiled): ids (B, T) = the newest token and
    T - 1 drafts at pos_BT. Verify, keep the longest prefix of drafts that are the argmaxes, run the module
    over the verified pairs, draft T - 1 tokens from its state at the last kept position (chained one
    position further per draft). -> argmaxes y (B, T), drafts kept (B,), next drafts (B, T - 1), logits
    (B, T, V). Positions past a row's kept tokens hold rejected work, overwritten by its next round."""
    B, T = ids_BT.shape
    states = decode_states(w, ids_BT, pos_BT, kvs, masked)  # (B, T, D)
    logits = _head(w, states.view(B * T, -1)).view(B, T, -1)
    y = logits.argmax(-1)  # (B, T): the first index of the maximum, as plain greedy's
    accepted = (ids_BT[:, 1:] == y[:, :-1]).cumprod(1).sum(1)  # (B,)
    rows = torch.arange(B, device=ids_BT.device)
    state = draft_states(w, d, y, states, pos_BT, draft_kv, masked)[rows, accepted]  # (B, D) at P + a
    drafts = [_head(w, state).argmax(-1)]
    for k in range(1, T - 1):  # draft k + 1 from (state, draft k) at P + a + k
        pos = (pos_BT[:, 0] + accepted + k)[:, None]
        state = draft_states(w, d, drafts[-1][:, None], state[:, None], pos, draft_kv, masked)[:, 0]
        drafts.append(_head(w, state).argmax(-1))
    return y, accepted, torch.stack(drafts, dim=1), logits


class SpeculativeDecoder(Decoder):
    """`Decoder` for `batch_size` rows of `tokens_per_row` tokens per verification, plus the first MTP
    module's draft steps. Positions are (B, T) long tensors. Like `Decoder.step`, the steps take the caches
    they attend to: per layer (B, L, r + dr), the rows and positions the caller picks (eager: up to the
    largest position + 1 or beyond, masked; compiled: the whole caches, for static shapes)."""

    def __init__(
        self,
        model: DeepSeekLM,
        batch_size: int,
        tokens_per_row: int,
        compile: bool = False,
        batch_invariant: bool = False,
    ) -> None:
        if not model.mtp:
            raise ValueError("speculative decoding needs MTP modules (num_nextn_predict_layers > 0)")
        # A verification's rows decide which MoE layers run dense and the oneDNN layouts (onednn.pack). At
        # least 3: decode packs from 3 rows, and at 2 oneDNN's products already beat MKL's, whose time grows
        # about linearly with a few rows on a CPU: the demo's (8192, 128) head at 2 rows takes 60 µs in
        # oneDNN, 119 µs in MKL; a (128, 4096) product 37 against 54 µs.
        rows = max(batch_size * tokens_per_row, 3)
        super().__init__(model, rows, compile, batch_invariant)
        cfg = model.config
        with torch.no_grad():
            dense = dense_experts(cfg, batch_size, compile)
            self.draft_weights = _draft_weights(
                model.mtp[0], dense, None if compile else rows, batch_invariant
            )
        self.batch_size, self.tokens_per_row = batch_size, tokens_per_row
        self.kv_width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        # A row's last token can sit at the last position of the context, its drafts past it. Their results
        # are never kept (every row stops at the context's end), but they need rope rows: the last one's.
        w = self.weights
        w.rope = torch.cat((w.rope, w.rope[:, -1:].expand(-1, 2 * tokens_per_row, -1)), dim=1)
        if compile:  # the greedy round's graph holds the head: inductor cannot lower oneDNN's layout
            w.head_DV, w.head_packed = model.lm_head.weight.detach().t().contiguous(), None

    def new_draft_cache(self, max_len: int, batch_size: int | None = None) -> torch.Tensor:
        """The MTP module's latent cache (B, max_len, r + dr), like one layer of a `LatentCache`."""
        e = self.weights.embed
        B = self.batch_size if batch_size is None else batch_size
        return torch.zeros(B, max_len, self.kv_width, device=e.device, dtype=e.dtype)

    @torch.no_grad()
    def verify(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor, kvs: list[torch.Tensor]) -> torch.Tensor:
        """The main model over ids (B, T) at pos_BT -> final-normed states (B, T, D) of every position."""
        if self.compile:
            step = compiled(decode_states, ids_BT.device.type)
            return step(self.weights, ids_BT.contiguous(), pos_BT.contiguous(), kvs, True)
        return decode_states(self.weights, ids_BT, pos_BT, kvs, True)

    @torch.no_grad()
    def greedy_round(
        self, ids_BT: torch.Tensor, pos_BT: torch.Tensor, kvs: list[torch.Tensor], draft_kv: torch.Tensor
    ):
        """`greedy_round` on the caches; draft_kv must reach T - 2 positions past the main caches' largest
        position + 1 (the chained drafts after a row's last kept token)."""
        w, d = self.weights, self.draft_weights
        if self.compile:
            step = compiled(greedy_round, ids_BT.device.type)
            return step(w, d, ids_BT.contiguous(), pos_BT.contiguous(), kvs, draft_kv, True)
        return greedy_round(w, d, ids_BT, pos_BT, kvs, draft_kv, True)

    @torch.no_grad()
    def draft(
        self, ids_BT: torch.Tensor, h_BTD: torch.Tensor, pos_BT: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        """The MTP module over (h_BTD, ids_BT) pairs at pos_BT -> its normed states (B, T, D)."""
        w, d = self.weights, self.draft_weights
        if self.compile:
            step = compiled(draft_states, ids_BT.device.type)
            return step(w, d, ids_BT.contiguous(), h_BTD.contiguous(), pos_BT.contiguous(), kv, True)
        return draft_states(w, d, ids_BT, h_BTD, pos_BT, kv, True)
