"""The train step (micro-batches → one optimizer step), evaluation, and the loop around them.

Per optimizer step every rank runs `grad_accum_steps` micro-batches (gradient all-reduce only on the last,
`no_sync` before), then one all-reduce of a small float64 vector carries the step's losses, the stop flag
and the MoE router statistics, so every rank takes the same decisions (skip a non-finite step, stop) and
updates the router biases from the same global token counts. With multi-token prediction the loss adds
λ · the mean of the MTP depths' cross-entropies (λ from `mtp_weight`).

What a step does and how it is evaluated and reported is the run's objective (`Trainer.objective`): next-token
prediction (`NextTokenPrediction`, pretraining and fine-tuning) unless the run brings its own (rl/: GRPO). The
loop around it (time budget, Ctrl-C, periodic evaluation, checkpoints, samples, logging) is the same.
Legend: L MoE layers (the MTP modules' last), E routed experts, K MTP depths.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.data import baselines
from deepseek_lm.model.loss import IGNORE_INDEX
from deepseek_lm.train import distributed as D
from deepseek_lm.train import expert_parallel as EP
from deepseek_lm.train.budget import TimeBudget
from deepseek_lm.train.monitor import (
    Monitor,
    Window,
    bits_per_byte,
    format_eval,
    format_train,
    resource_usage,
)
from deepseek_lm.train.plots import plot_run
from deepseek_lm.train.samples import format_samples, generate_samples
from deepseek_lm.train.step_result import StepResult
from deepseek_lm.train.trainer import Trainer, full_model_state, save

NONFINITE_LIMIT = 3  # non-finite steps in a row before the run saves and stops


class StopSignal:
    """SIGINT / SIGTERM ask the loop to stop after the current step; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if os.environ.get("RANK", "0") == "0":  # every process of a torchrun job gets it: one says so
            print(
                f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint",
                flush=True,
            )

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------------------
# one optimizer step


def mtp_weight(t: Trainer) -> float:
    """λ of the coming step: `mtp_weight`, then `mtp_weight_final` once `mtp_weight_switch` of the run has
    passed (by steps; by the training clock under the time-budget schedule)."""
    cfg = t.cfg
    if cfg.mtp_weight_final is None:
        return cfg.mtp_weight
    if cfg.schedule_by_time and cfg.max_time_minutes:
        progress = t.state.train_seconds / (cfg.max_time_minutes * 60)
    else:
        progress = t.state.step / t.total_steps
    return cfg.mtp_weight if progress < cfg.mtp_weight_switch else cfg.mtp_weight_final


def forward_backward(t: Trainer, x: torch.Tensor, y: torch.Tensor, sync: bool, **inputs: Any) -> Any:
    """One micro-batch: forward with the step's precision, backward of (CE + MoE aux + λ · MTP) / accumulation.
    `inputs`: the batch's other model inputs (packed conversations' `doc_ids`)."""
    with D.grad_sync(t.model, sync), t.precision.autocast():
        out = t.model(x, targets=y, **inputs)
        loss = out.loss + out.aux_loss
        if out.mtp_losses:  # DeepSeek-V3 eq. 25: λ times the mean over depths
            loss = loss + mtp_weight(t) * torch.stack(out.mtp_losses).mean()
        loss = loss / t.cfg.grad_accum_steps
    t.scaler.scale(loss).backward()
    if sync and t.ep is not None and not t.fsdp:  # DDP has reduced the other gradients by now
        EP.reduce_expert_grads(t.raw_model, t.ep)
    return out


def _micro_batch_stats(out: Any) -> torch.Tensor:
    """[ce, aux, MTP loss (K), MTP top-1 hits (K), MTP targets (K), counts (L·E), dropped (L), entropy (L)]
    of one forward, as one float64 vector."""
    parts = [out.loss.detach().reshape(1), out.aux_loss.detach().reshape(1)]
    for values in (out.mtp_losses, out.mtp_top1, out.mtp_tokens):
        parts += [v.detach().reshape(1) for v in values]
    stats = out.router_stats or []
    parts += [s.counts.reshape(-1) for s in stats]
    parts += (
        [torch.stack([s.dropped_frac for s in stats]), torch.stack([s.entropy for s in stats])]
        if stats
        else []
    )
    device = out.loss.device  # dropped_frac may live on the CPU
    return torch.cat([p.to(device=device, dtype=torch.float64) for p in parts])


def _unpack(v: torch.Tensor, n_layers: int, n_experts: int, n_depths: int, n_micro: int) -> dict[str, Any]:
    """Split the reduced vector back; `n_micro` = micro-batches summed (accumulation × ranks)."""
    stats = {"loss": v[0].item() / n_micro, "aux_loss": v[1].item() / n_micro, "stop": v[-1].item() > 0}
    K = n_depths
    stats["mtp_loss_K"] = (v[2 : 2 + K] / n_micro).tolist()
    stats["mtp_top1_K"], stats["mtp_tokens_K"] = (
        v[2 + K : 2 + 2 * K].tolist(),
        v[2 + 2 * K : 2 + 3 * K].tolist(),
    )
    start = 2 + 3 * K
    counts_end = start + n_layers * n_experts
    if n_layers:
        stats["counts_LE"] = v[start:counts_end].reshape(n_layers, n_experts)
        stats["dropped_L"] = (v[counts_end : counts_end + n_layers] / n_micro).float()
        stats["entropy_L"] = (v[counts_end + n_layers : counts_end + 2 * n_layers] / n_micro).float()
    return stats


def optimizer_step(t: Trainer) -> float | None:
    """Unscale, clip, step, then the schedule; None (and no update) when the gradients are not finite."""
    norm = apply_gradients(t)
    if norm is not None:
        t.scheduler.step()
    return norm


def apply_gradients(t: Trainer) -> float | None:
    """Unscale, clip, step (the schedule untouched: an objective may update several times per step); None
    (and no update) when the gradients are not finite."""
    t.scaler.unscale_(t.optimizer)
    max_norm = t.cfg.grad_clip if t.cfg.grad_clip > 0 else math.inf
    norm = D.clip_grad_norm(t.raw_model, max_norm, t.ep)
    if not math.isfinite(norm) and not t.scaler.is_enabled():  # fp16's scaler skips such steps itself
        t.optimizer.zero_grad(set_to_none=True)
        return None
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    return norm


def run_micro_batches(t: Trainer) -> tuple[torch.Tensor, int, int]:
    """Forward + backward over the step's micro-batches -> (summed stats vector, MoE layers, MTP depths)."""
    accum, total = t.cfg.grad_accum_steps, None
    for i in range(accum):
        x, y, inputs = on_device(next(t.loader), t.device)  # (B, T) each
        out = forward_backward(t, x, y, sync=i == accum - 1, **inputs)
        stats = _micro_batch_stats(out)
        total = stats if total is None else total + stats
    return total, len(out.router_stats or []), len(out.mtp_losses)


def on_device(batch: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A loader's (x, y) or (x, y, {other model inputs}) → the same on `device`, the inputs as a dict."""
    x, y, *rest = batch
    inputs = {k: v.to(device, non_blocking=True) for k, v in (rest[0] if rest else {}).items()}
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), inputs


def train_step(t: Trainer, stop_requested: bool) -> StepResult:
    lr, lam = t.optimizer.param_groups[0]["lr"], mtp_weight(t)
    total, n_layers, n_depths = run_micro_batches(t)
    flag = torch.tensor([1.0 if stop_requested else 0.0], dtype=torch.float64, device=total.device)
    reduced = D.all_reduce(torch.cat([total, flag]), t.dist)  # one collective carries all the step's stats
    n_micro = t.cfg.grad_accum_steps * t.dist.world_size
    s = _unpack(reduced.cpu(), n_layers, t.model_config.n_routed_experts, n_depths, n_micro)
    mtp = dict(mtp_loss_K=s["mtp_loss_K"], mtp_top1_K=s["mtp_top1_K"], mtp_tokens_K=s["mtp_tokens_K"])
    finite = math.isfinite(s["loss"] + s["aux_loss"] + sum(s["mtp_loss_K"]))
    norm = optimizer_step(t) if finite else None
    if norm is None:
        t.optimizer.zero_grad(set_to_none=True)
        return StepResult(s["loss"], s["aux_loss"], math.nan, lr, True, s["stop"], None, None, None, **mtp)
    if n_layers:
        t.raw_model.update_router_biases(list(s["counts_LE"].to(t.device)))
    t.state.step += 1
    t.state.tokens_seen += t.tokens_per_step
    moe = (s.get("counts_LE"), s.get("dropped_L"), s.get("entropy_L"))
    return StepResult(s["loss"], s["aux_loss"], norm, lr, False, s["stop"], *moe, **mtp, mtp_weight=lam)


# ---------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(t: Trainer, max_batches: int | None) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte over the first `max_batches` batches (all: None).

    `selection_loss` is the loss over the first `eval_batches` batches, the set every periodic evaluation
    scores, so that the best checkpoint is chosen by one yardstick. Every rank evaluates the same windows
    (deterministic): no reduction is needed, and FSDP2's collectives line up.
    """
    model = t.model if t.fsdp else t.raw_model  # DDP's wrapper is for training only
    model.eval()
    total = count = selection_total = selection_count = 0.0  # Σ loss·tokens and Σ tokens
    mtp_K = None  # per MTP depth: Σ loss·targets, Σ top-1 hits, Σ targets
    batches = t.data.val_batches(t.cfg.seq_len, t.cfg.micro_batch_size, max_batches)
    for i, batch in enumerate(batches):
        x, y, inputs = on_device(batch, t.device)
        with t.precision.autocast():
            out = model(x, targets=y, **inputs)
        n = int((y != IGNORE_INDEX).sum())  # every token of text; the answers of conversations
        total, count = total + out.loss.item() * n, count + n
        if i < t.cfg.eval_batches:
            selection_total, selection_count = total, count
        if out.mtp_losses:
            sums = torch.stack(
                [torch.stack(v).double() for v in (out.mtp_losses, out.mtp_top1, out.mtp_tokens)]
            )
            sums[0] *= sums[2]
            mtp_K = sums if mtp_K is None else mtp_K + sums
    model.train()
    loss = total / max(count, 1)
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": bits_per_byte(loss, t.data.bytes_per_token("val")),
        "tokens": int(count),
        "selection_loss": selection_total / max(selection_count, 1),
    }
    if mtp_K is not None:
        metrics["mtp_loss"] = (mtp_K[0] / mtp_K[2].clamp(min=1)).tolist()
        metrics["mtp_top1"] = (mtp_K[1] / mtp_K[2].clamp(min=1)).tolist()
    return metrics


def warn_nonfinite(t: Trainer, r: StepResult) -> None:
    warnings.warn(
        f"step {t.state.step + 1}: non-finite loss or gradients (loss {r.loss}, aux {r.aux_loss}); "
        f"step skipped ({t.state.nonfinite_in_a_row} in a row)",
        RuntimeWarning,
        stacklevel=2,
    )


# ---------------------------------------------------------------------------------------------------------
# the loop


def train_loop(
    t: Trainer,
    monitor: Monitor | None,
    stop: StopSignal,
    peak_flops: float | None,
    stop_at_step: int | None = None,
) -> str:
    """Optimizer steps until done; returns why it stopped:
    "done" | "time" (budget) | "signal" | "paused" (reached `stop_at_step`) | "nonfinite"."""
    window = Window()
    reason = run_steps(t, monitor, stop, window, peak_flops, stop_at_step)
    if window.steps:  # the last, partial log window
        log_window(t, monitor, window, peak_flops)
    return reason


def run_steps(
    t: Trainer,
    monitor: Monitor | None,
    stop: StopSignal,
    window: Window,
    peak_flops: float | None,
    stop_at_step: int | None,
) -> str:
    start, clock_before = time.monotonic(), t.state.train_seconds
    deadline = start + t.cfg.max_time_minutes * 60 if t.cfg.max_time_minutes is not None else math.inf
    budget = TimeBudget(t) if t.cfg.schedule_by_time and deadline < math.inf else None
    pause_at = stop_at_step if stop_at_step is not None else math.inf
    while t.state.step < min(t.total_steps, pause_at):
        over_time = t.dist.is_main and time.monotonic() > deadline  # rank 0's clock decides for all
        pausing = t.state.step + 1 >= pause_at
        budget_used = budget.set_lr() if budget is not None else False
        result = objective(t).step(t, stop.requested or over_time or pausing or budget_used)
        if result.skipped:
            t.state.nonfinite_in_a_row += 1
            if t.dist.is_main:
                warn_nonfinite(t, result)
            if t.state.nonfinite_in_a_row >= NONFINITE_LIMIT:
                return "nonfinite"
        else:
            t.state.nonfinite_in_a_row = 0
            window.add(result)
            after_step(t, monitor, window, result, peak_flops)
        t.state.train_seconds = clock_before + time.monotonic() - start
        if result.stop:
            return "time" if over_time else "paused" if pausing else "done" if budget_used else "signal"
    return "done" if t.state.step >= t.total_steps else "paused"


def after_step(
    t: Trainer, monitor: Monitor | None, window: Window, result: StepResult, peak_flops: float | None
) -> None:
    """Periodic logging, evaluation, checkpoints and samples; the final step's are the caller's."""
    step, cfg = t.state.step, t.cfg
    if monitor is not None:
        monitor.advance(step, result.loss, result.lr, t.tokens_per_step / max(window.step_time(), 1e-9))
    if step % cfg.log_every == 0:
        log_window(t, monitor, window, peak_flops)
    if step >= t.total_steps:
        return
    if _due(step, cfg.eval_every):
        run_eval(t, monitor, cfg.eval_batches, save_if_best=True)
    elif _due(step, cfg.save_every):
        save(t)
    if _due(step, cfg.sample_every):
        run_samples(t, monitor)


def log_window(t: Trainer, monitor: Monitor | None, window: Window, peak_flops: float | None) -> None:
    record = objective(t).train_record(t, window.record(t, peak_flops))
    if monitor is not None:
        monitor.log(record | resource_usage(monitor.process, t.device))
        monitor.print(objective(t).train_line(t, record))
    window.reset()


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def run_eval(t: Trainer, monitor: Monitor | None, max_batches: int | None, *, save_if_best: bool) -> dict:
    metrics = objective(t).evaluate(t, max_batches)
    is_best = metrics["selection_loss"] < t.state.best_val_loss
    if is_best:
        t.state.best_val_loss = metrics["selection_loss"]
    if monitor is not None:
        monitor.log({"kind": "eval", "step": t.state.step, **metrics, "full": max_batches is None})
        monitor.print(objective(t).eval_line(t, metrics))
    if save_if_best and (is_best or _due(t.state.step, t.cfg.save_every)):
        save(t, is_best=is_best)
    return metrics | {"is_best": is_best}


def run_samples(t: Trainer, monitor: Monitor | None) -> list[str]:
    """Samples from the fixed prompts, on rank 0 only. Under FSDP2 or expert parallelism the full weights are
    gathered (every rank takes part) into a plain copy: the engine's cached decoding then never runs through
    sharded modules."""
    state = full_model_state(t) if t.sharded else None
    if not t.dist.is_main:
        return []
    model = t.raw_model if state is None else plain_copy(t, state)
    chat = t.data.chat_template
    texts = generate_samples(model, t.data.tokenizer, t.cfg, seed=t.cfg.seed, chat_template=chat)
    model.train()
    if monitor is not None:
        monitor.log({"kind": "sample", "step": t.state.step, "prompts": t.cfg.sample_prompts, "texts": texts})
        samples = format_samples(t.cfg.sample_prompts, texts, between=" → " if chat is not None else "")
        monitor.print(f"samples at step {t.state.step}:\n" + samples)
    return texts


def plain_copy(t: Trainer, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from deepseek_lm.model import get_model

    devices = [t.device] if t.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # initialisation must not advance the training RNGs
        model = get_model(t.model_config, device=t.device)
    ckpt.load_model_weights(model, state, t.model_config, t.run_dir)
    return model


# ---------------------------------------------------------------------------------------------------------
# the objective


class NextTokenPrediction:
    """The objective of pretraining and fine-tuning, and the interface of every objective (rl/: GRPO):

    step(t, stop_requested) -> StepResult      one optimizer step (updates t.state.step and tokens_seen)
    evaluate(t, max_batches) -> metrics        with "selection_loss" (lower is better: it picks `best`)
    train_record(t, record) -> record          the log window's record with the objective's derived values
    train_line(t, record), eval_line(t, metrics) -> one log line each
    describe(t) -> lines                       the header's lines on the batch and the data
    final_lines(t, val) -> lines               the end-of-run summary's lines on the final evaluation
    plot(t) -> paths                           the end-of-run PNG plots
    close()                                    release what it holds (threads), whatever ended the run
    """

    def step(self, t: Trainer, stop_requested: bool) -> StepResult:
        return train_step(t, stop_requested)

    def evaluate(self, t: Trainer, max_batches: int | None) -> dict[str, float]:
        return evaluate(t, max_batches)

    def train_record(self, t: Trainer, record: dict[str, Any]) -> dict[str, Any]:
        return record | {"bits_per_byte": bits_per_byte(record["loss"], t.data.bytes_per_token("train"))}

    def train_line(self, t: Trainer, record: dict[str, Any]) -> str:
        show_mfu = t.device.type == "cuda" or bool(t.cfg.peak_flops)
        return format_train(record, t.total_steps, show_mfu=show_mfu)

    def eval_line(self, t: Trainer, metrics: dict[str, Any]) -> str:
        return format_eval(metrics, baselines.named(t.data.manifest), t.state.step)

    def describe(self, t: Trainer) -> list[str]:
        cfg, manifest = t.cfg, t.data.manifest
        bars = ", ".join(f"{name} {value:.3f}" for name, value in baselines.named(manifest).items())
        return [
            f"global batch {cfg.micro_batch_size} × {cfg.grad_accum_steps} accumulation × {t.dist.world_size} "
            f"process(es) = {cfg.micro_batch_size * cfg.grad_accum_steps * t.dist.world_size} sequences "
            f"× {cfg.seq_len} tokens = {t.tokens_per_step:,} tokens per step",
            f"data {t.data.path}: {manifest['splits']['train']['tokens']:,} train / "
            f"{manifest['splits']['val']['tokens']:,} val tokens"
            + (f" · baselines {bars} bits/byte" if bars else ""),
        ]

    def final_lines(self, t: Trainer, val: dict[str, Any]) -> list[str]:
        bpb = val["bits_per_byte"]
        verdict = "".join(
            f" · {name}: {value:.3f} bits/byte → {'beats' if bpb < value else 'does not beat'} {name.split()[0]}"
            for name, value in baselines.named(t.data.manifest).items()
        )
        return [
            f"final: val loss {val['loss']:.4f} · perplexity {val['perplexity']:.1f} · {bpb:.3f} bits/byte{verdict}"
        ]

    def plot(self, t: Trainer) -> list[Path]:
        return plot_run(t.run_dir, baselines.named(t.data.manifest))

    def close(self) -> None:
        pass


NEXT_TOKEN = NextTokenPrediction()


def objective(t: Trainer) -> Any:
    """The run's objective: its own, else next-token prediction."""
    return t.objective if t.objective is not None else NEXT_TOKEN
