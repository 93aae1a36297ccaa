"""The decoder block: pre-norm RMSNorm, MLA, then a dense SwiGLU or DeepSeekMoE, each added to the residual.

Used by the main model's layers (transformer.py) and by each multi-token-prediction module (mtp.py).
"""

from __future__ import annotations

import torch
from torch import nn

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model.layers import RMSNorm, SwiGLU
from deepseek_lm.model.mla import MLA, Positions
from deepseek_lm.model.moe import MoE


class Block(nn.Module):
    def __init__(self, config: DeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, pos: Positions, cache: torch.Tensor | None = None, last_only: bool = False
    ):
        """-> x, aux loss (or None for a dense layer), RouterStats (or None). `last_only`: x of each row's last
        token alone (B, 1, D), the attention's latents written for all (`MLA.forward`)."""
        attn = self.self_attn(self.input_layernorm(x), pos, cache, last_only)
        x = (x[:, -1:] if last_only else x) + attn
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, aux, stats = self.mlp(h)
            return x + out, aux, stats
        return x + self.mlp(h), None, None
