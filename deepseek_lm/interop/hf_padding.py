"""Attention heads zero-padded to a size vLLM's CPU kernels take, computing the same function.

vLLM 0.32's CPU build runs MLA with head size 576 only (DeepSeek-V3's 512 + 64) and, with
`VLLM_MLA_DISABLE=1`, plain attention over heads of 32 to 512 dimensions; the small presets' heads have 16
to 24. Padding each head's q/k part and v part with zeros is exact:
- the extra q/k dimensions are zero in the keys (rows of kv_b_proj), so every score keeps its value;
- softmax's scale 1/sqrt(qk_head_dim) shrinks with the padding, so the queries are scaled up to compensate;
  padding qk_head_dim by a factor 4^k makes that scale 2^k, a power of two, so the products are exact;
- the extra v dimensions are zero (rows of kv_b_proj), and so are the o_proj columns that read them.
RoPE keeps its last qk_rope_head_dim dimensions of each head: the padding goes between nope and rope.

Legend: H heads, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim, R kv_lora_rank; primes: padded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from deepseek_lm.config import DeepSeekConfig

VLLM_MIN_HEAD_DIM = 32  # vLLM's CPU attention (VLLM_MLA_DISABLE=1) takes head dims 32 to 512


def pad_attention_heads(
    config: DeepSeekConfig, state: Mapping[str, torch.Tensor], min_head_dim: int = VLLM_MIN_HEAD_DIM
) -> tuple[DeepSeekConfig, dict[str, torch.Tensor]]:
    """The config and state_dict with q/k heads of qk_head_dim · 4^k ≥ min_head_dim and v heads as wide;
    unchanged when the heads are already that wide."""
    qk = config.qk_head_dim
    k = 0
    while qk * 4**k < min_head_dim:
        k += 1
    if k == 0 and config.v_head_dim >= min_head_dim:
        return config, dict(state)
    qk2 = qk * 4**k
    sizes = dict(n=config.qk_nope_head_dim, r=config.qk_rope_head_dim, v=config.v_head_dim,
                 n2=qk2 - config.qk_rope_head_dim, v2=max(qk2, config.v_head_dim), H=config.num_attention_heads)  # fmt: skip
    padded = {name: _pad(name, w, sizes, 2.0**k) for name, w in state.items()}
    fields = {**config.to_dict(), "qk_nope_head_dim": sizes["n2"], "v_head_dim": sizes["v2"]}
    return DeepSeekConfig.from_dict(fields), padded


def _pad(name: str, w: torch.Tensor, s: dict[str, int], q_scale: float) -> torch.Tensor:
    H, n, r, v, n2, v2 = s["H"], s["n"], s["r"], s["v"], s["n2"], s["v2"]
    if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):  # (H·(n + r), in)
        q = w.view(H, n + r, -1) * q_scale
        return torch.cat([q[:, :n], q.new_zeros(H, n2 - n, q.shape[-1]), q[:, n:]], dim=1).flatten(0, 1)
    if name.endswith("self_attn.kv_b_proj.weight"):  # (H·(n + v), R): per head [k_nope; v]
        kv = w.view(H, n + v, -1)
        zeros = kv.new_zeros
        parts = [kv[:, :n], zeros(H, n2 - n, kv.shape[-1]), kv[:, n:], zeros(H, v2 - v, kv.shape[-1])]
        return torch.cat(parts, dim=1).flatten(0, 1)
    if name.endswith("self_attn.o_proj.weight"):  # (D, H·v): per head v input columns
        o = w.view(w.shape[0], H, v)
        return torch.cat([o, o.new_zeros(w.shape[0], H, v2 - v)], dim=2).flatten(1)
    return w
