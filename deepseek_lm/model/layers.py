"""Building blocks: RMSNorm, rotary position embedding (with optional YaRN), the SwiGLU feed-forward.

RoPE layout: DeepSeek rotates *interleaved pairs* (x0, x1), (x2, x3), ... of the rope dimensions, each pair by
one frequency — the layout of DeepSeek's own weights, of transformers' `rope_interleave=True` (V3) and of V2's
complex rotation. The rotated vector stays interleaved; attention only ever takes dot products between
vectors rotated the same way, so any consistent output layout gives the same scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_lm.config import DeepSeekConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel (it accumulates in fp32 for bf16 inputs); it needs the weight in x's dtype, which
        # differs under autocast when x comes out of a bf16 matmul
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN of the first layers and the shared experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# rope ---------------------------------------------------------------------------------------------------------


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(config: DeepSeekConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dr/2,) and the factor that multiplies cos/sin (1 without YaRN).

    YaRN (Peng et al. 2023, as in DeepSeek-V2/V3 and transformers): frequencies that rotate fewer than
    `beta_slow` times over the original context are interpolated by `factor`, those rotating more than
    `beta_fast` times are kept, with a linear ramp between.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling
    if not rs:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    orig = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all:
        return inv_freq, _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    return inv_freq, _yarn_mscale(factor)


def yarn_softmax_scale(config: DeepSeekConfig) -> float:
    """1/sqrt(qk_head_dim), times mscale² under YaRN (DeepSeek-V3 `softmax_scale`, transformers' `scaling`)."""
    scale = config.qk_head_dim**-0.5
    rs = config.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(rs["factor"]), rs["mscale_all_dim"]) ** 2
    return scale


def rope_tables(config: DeepSeekConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """(2, S, dr) fp32: cos repeated per pair, and sin with the pair's sign (-sin, +sin), for positions < S."""
    inv_freq, attn_factor = rope_inv_freq(config)
    pos = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)  # (S, dr/2), fp32 like transformers
    cos = (angles.cos() * attn_factor).repeat_interleave(2, dim=-1)
    sin = angles.sin() * attn_factor
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return torch.stack((cos, sin)).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s). x (..., T, h, dr), cos/sin (.., T, 1, dr)."""
    swapped = torch.stack((x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)  # (x1, x0, x3, x2, ...), one
    # kernel: flip over a last dimension of 2 runs ~7× slower on a CPU
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)  # keep x's dtype (bf16 under autocast)
