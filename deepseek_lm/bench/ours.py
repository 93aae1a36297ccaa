"""Our model as the bench builds it from a preset's state dict."""

from __future__ import annotations

import torch

from deepseek_lm.config import DeepSeekConfig


def load_ours(config: DeepSeekConfig, state: dict, device: torch.device, dtype: torch.dtype | None = None):
    from deepseek_lm.model import get_model

    model = get_model(config, device=device)
    model.load_state_dict(state)
    return model.to(dtype) if dtype is not None else model
