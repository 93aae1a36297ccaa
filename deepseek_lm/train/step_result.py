"""What one optimizer step reports (`loop.train_step` makes it, `monitor.Window` sums it): its own module, so
that the monitor reads the loop's output without importing the loop. Legend: L MoE layers, E routed experts,
K MTP depths."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepResult:
    loss: float  # mean cross-entropy over the step's micro-batches and ranks (nats / token)
    aux_loss: float
    grad_norm: float  # before clipping; nan when the step was skipped
    lr: float  # the learning rate this step used (of the decayed group; all groups share the schedule)
    skipped: bool  # non-finite loss or gradients: no update
    stop: bool  # some rank was asked to stop (signal, time budget)
    counts_LE: torch.Tensor | None  # routed tokens per expert, summed over micro-batches and ranks
    dropped_L: torch.Tensor | None  # mean dropped fraction per MoE layer
    entropy_L: torch.Tensor | None  # mean router entropy per MoE layer
    # multi-token prediction, per depth (empty without MTP): mean CE; top-1 hits and valid targets, summed
    mtp_loss_K: list[float] = field(default_factory=list)
    mtp_top1_K: list[float] = field(default_factory=list)
    mtp_tokens_K: list[float] = field(default_factory=list)
    mtp_weight: float = 0.0  # λ of this step
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own, averaged over a log window
