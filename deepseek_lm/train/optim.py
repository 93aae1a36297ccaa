"""AdamW with decay / no-decay groups, and the learning-rate schedule (warmup, then decay to a floor)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from deepseek_lm.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only the matrices that multiply activations: no decay on norms, biases or embeddings.

    Weight decay on an embedding pulls rare tokens' rows to zero and on a norm's gain fights the scale it
    learns (as in nanoGPT / GPT-3). The MoE router bias is a buffer, updated by counting, so the optimizer
    never sees it. A tied head is the embedding, so it is not decayed either.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    # The fused kernel exists for CUDA and CPU tensors in recent torch; foreach is the portable fallback.
    fused = device_type in ("cuda", "cpu")
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    groups = param_groups(model, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    except (RuntimeError, ValueError):  # e.g. DTensor parameters or a device without the fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def decay_factor(progress: float, decay: str, floor: float) -> float:
    """The decay part of the schedule at `progress` ∈ [0, 1] of the post-warmup phase."""
    progress = min(max(progress, 0.0), 1.0)
    if decay == "constant":
        return 1.0
    if decay == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, *, warmup: int, total: int, decay: str, floor: float) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return decay_factor((step - warmup) / max(total - warmup - 1, 1), decay, floor)


def lr_factor_by_time(step: int, progress: float, *, warmup: int, decay: str, floor: float) -> float:
    """The time-budget schedule: warmup over the first steps, decay over the fraction of the budget used."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return warm * decay_factor(progress, decay, floor)


def schedule_factor(cfg: TrainConfig, total_steps: int) -> partial:
    return partial(
        lr_factor, warmup=cfg.warmup_steps, total=total_steps, decay=cfg.decay, floor=cfg.min_lr_ratio
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg, total_steps))
