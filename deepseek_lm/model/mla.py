"""Multi-head Latent Attention (DeepSeek-V2 §2.1) and its latent KV cache.

    c_q = RMSNorm(W_dq x)            q = W_uq c_q   (or q = W_q x when q_lora_rank is 0), per head [q_nope | q_pe]
    [c_kv | k_pe] = W_dkv x          c_kv = RMSNorm(c_kv);  [k_nope | v] = W_ukv c_kv per head
    score = (q_nope·k_nope + RoPE(q_pe)·RoPE(k_pe)) · scale,  k_pe one rope key shared by all heads

Two paths with the same math:
- naive (training, no cache): materialise k and v per head and call SDPA(is_causal=True);
- absorbed (with a cache): q_nope·k_nope = (W_uk^T q_nope)·c_kv, so W_uk folds into the query and W_uv into
  the output, attention runs over the latent cache and the cache holds only c_kv and rotated k_pe:
  kv_lora_rank + qk_rope_head_dim numbers per token per layer (DeepSeek-V3 inference/model.py, "absorb").
  A prefill from position 0 has no cache to read: it writes c_kv and k_pe, then runs the naive path, whose
  heads (dn + dr) are narrower than the absorbed ones (r + dr).

Shapes: B batch, T new tokens, H heads, L cache positions attended, r kv_lora_rank, dr rope dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model.layers import RMSNorm, apply_rope, yarn_softmax_scale


class LatentCache:
    """Per layer one (B, S, r + dr) buffer; `c_kv[i]` (B, S, r) and `k_pe[i]` (B, S, dr) are views into it.

    Stateless about positions: the caller says where each row's tokens go (`start_pos`, CONTRACT.md).
    One buffer per layer lets the absorbed path score [q_lat | q_pe] against [c_kv | k_pe] in one matmul.
    """

    def __init__(
        self, config: DeepSeekConfig, batch_size: int, max_len: int, device=None, dtype=None
    ) -> None:
        r, dr = config.kv_lora_rank, config.qk_rope_head_dim
        shape = (batch_size, max_len, r + dr)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.c_kv = [buf[..., :r] for buf in self.kv]
        self.k_pe = [buf[..., r:] for buf in self.kv]

    @property
    def batch_size(self) -> int:
        return self.kv[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.kv[0].shape[1]

    def bytes_per_token(self) -> int:
        """Bytes one token takes in the cache over all layers (per batch row)."""
        return sum(buf.shape[-1] * buf.element_size() for buf in self.kv)


@dataclass
class Positions:
    """Where this forward's tokens sit; built once per forward and shared by every layer."""

    cos: torch.Tensor  # (B or 1, T, 1, dr) rope tables at the tokens' positions
    sin: torch.Tensor
    start: int | None = None  # uniform start position (int start_pos), else None
    pos_BT: torch.Tensor | None = None  # per-row absolute positions (tensor start_pos)
    kv_len: int = 0  # cache positions attended: max position + 1
    mask: torch.Tensor | None = None  # (B or 1, 1, T, L) bool, True = attend; None = attend to all L
    packed_mask: torch.Tensor | None = None  # (B, 1, T, T) bool: causal within each packed sequence

    def last(self) -> Positions:
        """The positions of each row's last token alone (its query sees what it saw among all T)."""
        return Positions(
            self.cos[:, -1:],
            self.sin[:, -1:],
            start=None if self.start is None else self.kv_len - 1,
            pos_BT=None if self.pos_BT is None else self.pos_BT[:, -1:],
            kv_len=self.kv_len,
            mask=None if self.mask is None else self.mask[..., -1:, :],
            packed_mask=None if self.packed_mask is None else self.packed_mask[..., -1:, :],
        )


def make_positions(rope: torch.Tensor, B: int, T: int, start_pos, cached: bool, max_len: int) -> Positions:
    """rope (2, S, dr) tables; start_pos int or (B,) long. Checks positions against the tables and cache."""
    dev = rope.device
    start, pos_BT, end = token_positions(start_pos, B, T, dev, rope.shape[1], max_len if cached else None)
    if start is not None:
        cos, sin = rope[:, start:end, None]  # (T, 1, dr)
        pos = Positions(cos[None], sin[None], start=start, kv_len=end)
        if cached and T > 1 and start > 0:  # from 0 the naive path runs, causal without a mask
            j = torch.arange(end, device=dev)
            pos.mask = (j <= torch.arange(start, end, device=dev)[:, None])[None, None]  # (1, 1, T, L)
        return pos
    cos, sin = rope[:, pos_BT, None]  # (B, T, 1, dr)
    mask = (torch.arange(end, device=dev) <= pos_BT[..., None])[:, None] if cached else None  # (B, 1, T, L)
    return Positions(cos, sin, pos_BT=pos_BT, kv_len=end, mask=mask)


def packed_positions(rope: torch.Tensor, doc_BT: torch.Tensor) -> Positions:
    """Rows that pack several sequences (fine-tuning on conversations): a sequence starts wherever `doc_BT`
    changes along a row; its positions restart at 0 there and its tokens attend only within it (a
    block-diagonal causal mask), so each computes exactly what it would alone."""
    T = doc_BT.shape[1]
    t_T = torch.arange(T, device=doc_BT.device)
    starts_BT = torch.ones_like(doc_BT, dtype=torch.bool)
    starts_BT[:, 1:] = doc_BT[:, 1:] != doc_BT[:, :-1]
    first_BT = torch.cummax(
        torch.where(starts_BT, t_T, 0), dim=1
    ).values  # where each token's sequence starts
    _check_end(T, rope.shape[1], None)  # no position exceeds T - 1
    pos_BT = t_T - first_BT
    cos, sin = rope[:, pos_BT, None]  # (B, T, 1, dr)
    j_T = t_T[None, None]  # keys
    mask = (j_T <= t_T[None, :, None]) & (j_T >= first_BT[:, :, None])  # (B, T, T): i sees first(i) <= j <= i
    return Positions(cos, sin, pos_BT=pos_BT, kv_len=T, packed_mask=mask[:, None])


def token_positions(
    start_pos: int | torch.Tensor, B: int, T: int, device, n_rope: int, cache_len: int | None
) -> tuple[int | None, torch.Tensor | None, int]:
    """-> (the start shared by all rows, else None; else the (B, T) absolute positions; max position + 1),
    checked against the rope tables' n_rope positions and the cache's length (None: no cache)."""
    if isinstance(start_pos, torch.Tensor) and start_pos.dim() == 0:
        start_pos = int(start_pos)
    if isinstance(start_pos, int):
        _check_end(start_pos + T, n_rope, cache_len)
        return start_pos, None, start_pos + T
    pos_BT = start_pos.to(device).view(B, 1) + torch.arange(T, device=device)
    first, last = torch.stack(torch.aminmax(pos_BT)).tolist()  # one host sync per forward
    if first < 0:
        raise ValueError(f"start_pos must be >= 0 (got {first})")
    _check_end(last + 1, n_rope, cache_len)
    return None, pos_BT, last + 1


def _check_end(end: int, n_rope: int, cache_len: int | None) -> None:
    if end > n_rope:
        raise ValueError(f"position {end - 1} is beyond max_position_embeddings ({n_rope})")
    if cache_len is not None and end > cache_len:
        raise ValueError(f"position {end - 1} does not fit the cache (max_len {cache_len})")


class MLA(nn.Module):
    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = (
            config.num_attention_heads, config.q_lora_rank, config.kv_lora_rank
        )  # fmt: skip
        self.dn, self.dr, self.dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.scale = yarn_softmax_scale(config)
        D, H, dqk, r = config.hidden_size, self.n_heads, config.qk_head_dim, config.kv_lora_rank
        if config.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * dqk, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, r + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(r, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(r, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, D, bias=False)

    def forward(
        self, x: torch.Tensor, pos: Positions, cache: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). `cache`: this layer's (B, S, r + dr) buffer, or None for the naive path.
        `last_only`: every token's latent (and with a cache, its place there), but the output of each row's
        last token alone, (B, 1, D): its query is the only one that runs (`Positions.last`)."""
        B, T, _ = x.shape
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, r)
        k_pe = apply_rope(k_pe[:, :, None], pos.cos, pos.sin)  # (B, T, 1, dr)
        if last_only:
            x, pos_q = x[:, -1:], pos.last()
        else:
            pos_q = pos
        Tq = x.shape[1]
        q = self.q_proj(x) if self.q_lora_rank == 0 else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, Tq, self.n_heads, -1).split([self.dn, self.dr], dim=-1)  # (B, Tq, H, dn|dr)
        q_pe = apply_rope(q_pe, pos_q.cos, pos_q.sin)  # (B, Tq, H, dr)
        if cache is not None:
            write_latent(cache, torch.cat((c_kv, k_pe[:, :, 0]), dim=-1), pos)
            if pos.start == 0 and T > 1:  # a prefill from position 0: nothing to read back, and the naive
                cache = None  # path is cheaper: heads of dn + dr, not r + dr (2k tokens: -17 %)
        if cache is None:
            o = self._naive(q_nope, q_pe, c_kv, k_pe, pos_q.packed_mask)
        else:
            o = self._absorbed(q_nope, q_pe, pos_q, cache)
        return self.o_proj(o.reshape(B, Tq, -1))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, packed_mask=None) -> torch.Tensor:
        """Queries (B, Tq, H, ·) of the last Tq of the T tokens (Tq = T, or 1) over all T keys."""
        B, T, H, Tq = *c_kv.shape[:2], self.n_heads, q_nope.shape[1]
        k_nope, v = self.kv_b_proj(c_kv).view(B, T, H, -1).split([self.dn, self.dv], dim=-1)
        # heads first and contiguous, as SDPA's CPU kernel reads them fastest: the cats write that layout
        q = torch.cat((q_nope.transpose(1, 2), q_pe.transpose(1, 2)), dim=-1)  # (B, H, Tq, dqk)
        k = torch.cat((k_nope.transpose(1, 2), k_pe.transpose(1, 2).expand(B, H, T, self.dr)), dim=-1)
        v = v.transpose(1, 2).contiguous()  # (B, H, T, dv)
        if packed_mask is None:  # causal; a last token alone sees every key
            o = F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=packed_mask, scale=self.scale)
        return o.transpose(1, 2)  # (B, Tq, H, dv)

    def _absorbed(self, q_nope, q_pe, pos: Positions, cache: torch.Tensor) -> torch.Tensor:
        """Queries at `pos` over the cache, which already holds every token's latent."""
        w_ukv = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.kv_lora_rank)
        # W_uk folded into the query: q_nope·(W_uk c_kv) = (W_uk^T q_nope)·c_kv
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_ukv[:, : self.dn])  # (B, T, H, r)
        o_lat = _latent_attention(torch.cat((q_lat, q_pe), dim=-1), cache, pos, self.scale, self.kv_lora_rank)
        return torch.einsum("bthr,hdr->bthd", o_lat, w_ukv[:, self.dn :])  # W_uv folded into the output


def _latent_attention(
    q: torch.Tensor, cache: torch.Tensor, pos: Positions, scale: float, r: int
) -> torch.Tensor:
    """Absorbed queries q (B, T, H, r + dr) over the cache's [c_kv | k_pe] (B, S, r + dr) -> o_lat (B, T, H, r).

    The cache already holds this forward's tokens. All heads read the same latent rows (MQA in the latent
    space), and a position's value is its c_kv.
    """
    B, T, H, _ = q.shape
    kv = cache[:, : pos.kv_len]  # (B, L, r + dr)
    if T == 1:  # decode: one small matmul + softmax beats SDPA's dispatch
        scores = torch.matmul(q.view(B, H, -1), kv.transpose(1, 2)) * scale  # (B, H, L)
        if pos.mask is not None:
            scores = scores.masked_fill(~pos.mask[:, 0], float("-inf"))
        return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(kv.dtype), kv[..., :r])[:, None]
    # several tokens after earlier ones (chunked prefill): v = [c_kv | k_pe], of k's head dim, keeps SDPA off
    # its slowest kernel; only its first r dims count
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), kv[:, None], kv[:, None], attn_mask=pos.mask, scale=scale, enable_gqa=True
    )
    return o.transpose(1, 2)[..., :r]


def write_latent(cache: torch.Tensor, new_BTC: torch.Tensor, pos: Positions) -> None:
    """Store the new tokens' [c_kv | k_pe] at their absolute positions."""
    if pos.start is not None:
        cache[:, pos.start : pos.start + new_BTC.shape[1]] = new_BTC
    else:
        rows = torch.arange(new_BTC.shape[0], device=cache.device)[:, None]
        cache[rows, pos.pos_BT] = new_BTC
