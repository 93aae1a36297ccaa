"""The time-budget schedule (`train.schedule_by_time` with `train.max_time_minutes`).

Warmup counts steps; the decay then follows the fraction of the wall-clock budget used, so the learning
rate reaches its floor exactly when the budget ends, however fast the machine is and however its speed
drifts (a CPU shared with other jobs). End-of-run work (the final evaluation, samples, checkpoint, plots)
is reserved from the budget up front. Rank 0's clock decides; its reading is broadcast each step so that
every rank uses the same learning rate. The price: learning rates depend on timing, so two runs are not
identical step for step; resume continues the run's training clock (`TrainState.train_seconds`).
"""

from __future__ import annotations

import statistics

from deepseek_lm.train import distributed as D
from deepseek_lm.train.optim import lr_factor_by_time
from deepseek_lm.train.trainer import Trainer

FINISH_RESERVE_S = 15.0  # samples, checkpoint and plots at the end, besides the final evaluation
RECENT_STEPS = 25  # the step time the reserve is estimated from: the median of this many latest steps


class TimeBudget:
    """The run's training clock is `TrainState.train_seconds`, which the loop advances after every step."""

    def __init__(self, t: Trainer) -> None:
        self.t = t
        self.seconds_before = t.state.train_seconds  # > 0 on resume
        self.total_s = t.cfg.max_time_minutes * 60
        self.steps = 0
        self._clock: float | None = None  # the training clock at the previous set_lr
        self._durations: list[float] = []  # the latest steps' durations, the first step's left out

    def progress(self) -> float:
        """Fraction of the budget used, the end-of-run work reserved (estimated from the mean step time)."""
        t = self.t
        # a typical step's time: the first step, which compiles (`train.compile`) or warms caches up, can
        # take a minute where the others take a fraction of a second, and a mean over a few steps would
        # reserve the whole budget for the final evaluation
        if self._durations:
            step_time = statistics.median(self._durations)
        elif self.steps > 1:  # steps whose durations were not seen one by one: their mean
            step_time = (t.state.train_seconds - self.seconds_before) / self.steps
        else:  # none yet, or only the first: no estimate, nothing reserved yet
            step_time = 0.0
        # the final evaluation is forward-only over the validation split, ~1/3 of a training step per batch,
        # and every process scores the whole split (evaluate() needs no reduction), at its own share's pace
        per_process = t.tokens_per_step / t.dist.world_size
        final_eval_s = t.data.manifest["splits"]["val"]["tokens"] / per_process / 3 * step_time
        usable_s = max(self.total_s - final_eval_s - FINISH_RESERVE_S, 1e-9)
        return t.state.train_seconds / usable_s

    def record_step(self) -> None:
        """Read the training clock before a step: the duration of the step just run joins the recent ones
        (not the run's first, nor the first after a resume)."""
        now = self.t.state.train_seconds
        if self._clock is not None and self.steps > 1:
            self._durations.append(now - self._clock)
            del self._durations[:-RECENT_STEPS]
        self._clock = now

    def set_lr(self) -> bool:
        """Set the coming step's learning rate; True when the budget is used up (make it the last step)."""
        t = self.t
        self.record_step()
        progress = D.broadcast_object(self.progress() if t.dist.is_main else None, t.dist)
        cfg = t.cfg
        factor = lr_factor_by_time(
            t.state.step, progress, warmup=cfg.warmup_steps, decay=cfg.decay, floor=cfg.min_lr_ratio
        )
        for group in t.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.steps += 1
        return progress >= 1.0
