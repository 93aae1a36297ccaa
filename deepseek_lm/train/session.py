"""A whole training run as one library call: build, report, loop, final evaluation, samples, save, plots.

from deepseek_lm import DeepSeekConfig
from deepseek_lm.train import TrainConfig, train
result = train(DeepSeekConfig.from_preset("tiny"), TrainConfig(data_dir="data", max_steps=100), "runs/x")
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError
from deepseek_lm.train import distributed as D
from deepseek_lm.train.config import TrainConfig
from deepseek_lm.train.loop import StopSignal, objective, run_eval, run_samples, train_loop
from deepseek_lm.train.monitor import Monitor, init_wandb, measure_matmul_peak, truncate_metrics
from deepseek_lm.train.trainer import Trainer, build_trainer, open_data, save

STOP_MESSAGES = {
    "done": "finished",
    "time": "stopped: the time budget (train.max_time_minutes) ran out",
    "signal": "stopped by a signal",
    "paused": "paused at --stop-at-step (continue with --resume)",
    "nonfinite": "stopped: non-finite loss",
}


class TrainingDiverged(UserError):
    """The loss stayed non-finite; the run saved a checkpoint of its last good state and stopped."""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None  # the last one written
    step: int
    reason: str  # done | time | signal | paused | nonfinite
    val: dict[str, float] | None  # the final evaluation (whole validation split)
    samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def train(
    model_config: DeepSeekConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    preset: str | None = None,
    stop_at_step: int | None = None,
    data_source: Callable[[TrainConfig, D.DistInfo], Any] = open_data,
    initial_state: Mapping[str, Any] | None = None,
    eval_first: bool = False,
    make_objective: Callable[[Trainer], Any] | None = None,
) -> TrainResult:
    """Train in `out_dir` (created); with `resume`, continue from its latest complete checkpoint.

    `stop_at_step` ends this invocation after that optimizer step (evaluate, save) without shortening
    the schedule: a long run in chunks, e.g. on preemptible machines. `data_source` and `initial_state` as
    in `build_trainer` (fine-tuning: train/finetune.py); `eval_first` evaluates before the first step.
    `make_objective(trainer)` builds what the steps optimise once the trainer is up (loop.NextTokenPrediction's
    interface; rl/: GRPO); None: next-token prediction.
    """
    start = time.monotonic()
    stop = StopSignal().install()
    monitor, t = None, None
    try:
        t = build_trainer(
            model_config, cfg, out_dir, resume=resume, data_source=data_source, initial_state=initial_state
        )
        if make_objective is not None:
            t.objective = make_objective(t)
        if t.dist.is_main:
            prepare_run_dir(t, resume, preset)
            monitor = make_monitor(t)
        with D.collective_guard(t.dist):
            if eval_first and t.resumed_from is None:  # the starting point, e.g. the base model's answer loss
                run_eval(t, monitor, None, save_if_best=False)
            peak = t.cfg.peak_flops or measure_matmul_peak(t.device, t.precision.dtype)
            reason = train_loop(t, monitor, stop, peak, stop_at_step)
            result = finish(t, monitor, reason, time.monotonic() - start)
            sys.stdout.flush()  # all the run printed is out before the teardown below, whatever happens there
            # leave together: no rank tears its process group down while rank 0 still samples and saves.
            # (The "terminate called without an active exception" aborts once blamed on that came from
            # interpreter exit, which the CLI skips under torchrun: cli.py.)
            D.barrier(t.dist)
            return result
    finally:
        if monitor is not None:
            monitor.close()
        if t is not None:
            objective(t).close()
        stop.restore()
        D.shutdown()


# ---------------------------------------------------------------------------------------------------------
# start


def prepare_run_dir(t: Trainer, resume: bool, preset: str | None) -> None:
    """Refuse to mix two runs in one directory; on resume drop metrics the resumed steps will re-log."""
    t.run_dir.mkdir(parents=True, exist_ok=True)
    if t.resumed_from is None and ckpt.list_checkpoints(t.run_dir):
        hint = "none of them has a trainer_state.pt to resume from" if resume else "pass --resume to continue"
        raise UserError(
            f"{t.run_dir} already holds checkpoints of another run ({hint}); choose another --out"
        )
    if resume and t.resumed_from is None:
        print(f"nothing to resume in {t.run_dir}: starting from scratch", flush=True)
    if t.resumed_from is not None:
        truncate_metrics(t.run_dir, t.state.step)
    elif (t.run_dir / "metrics.jsonl").exists():
        (t.run_dir / "metrics.jsonl").unlink()
    resolved = {"preset": preset, "model": t.model_config.to_dict(), "train": t.cfg.to_dict()}
    (t.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    print(header(t, resolved), flush=True)


def header(t: Trainer, resolved: dict[str, Any]) -> str:
    cfg, counts = t.cfg, t.raw_model.param_counts()
    E, ep = t.model_config.n_routed_experts, t.ep.size if t.ep else 1
    epochs = t.total_steps * cfg.grad_accum_steps / t.loader.batches_per_epoch
    lines = [
        f"run {t.run_dir}"
        + (f" (resumed from {t.resumed_from} at step {t.state.step})" if t.resumed_from else ""),
        "resolved config:",
        *("  " + line for line in yaml.safe_dump(resolved, sort_keys=False).splitlines()),
        f"device {t.device} · precision {t.precision.name} · {t.dist.world_size} process(es)"
        + (" · FSDP2" if t.fsdp else " · DDP" if t.dist.enabled else "")
        + (f" · expert parallel {ep} ({E // ep} of {E} routed experts per process)" if ep > 1 else ""),
        *objective(t).describe(t)[:1],
        f"model: {counts['total'] / 1e6:.2f} M parameters ({counts['activated'] / 1e6:.2f} M activated per token, "
        f"{counts['embedding'] / 1e6:.2f} M embedding) · vocabulary {t.model_config.vocab_size:,}"
        + mtp_note(t, counts["mtp"]),
        *objective(t).describe(t)[1:],
        schedule_line(t, epochs),
    ]
    return "\n".join(lines)


def mtp_note(t: Trainer, n_params: int) -> str:
    if not t.raw_model.mtp:
        return ""
    cfg, weight = t.cfg, f"λ {t.cfg.mtp_weight:g}"
    if cfg.mtp_weight_final is not None:
        weight += f", {cfg.mtp_weight_final:g} after {cfg.mtp_weight_switch:.0%} of the run"
    return f" · MTP: {len(t.raw_model.mtp)} module(s) of {n_params / 1e6:.2f} M parameters, {weight}"


def schedule_line(t: Trainer, epochs: float) -> str:
    cfg = t.cfg
    lrs = f"lr {cfg.lr:g}, warmup {cfg.warmup_steps} steps, {cfg.decay} to {cfg.lr * cfg.min_lr_ratio:g}"
    if cfg.optimizer == "muon":
        muon_lr = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
        lrs = f"Muon lr {muon_lr:g} ({cfg.muon_adjust_lr}) + AdamW {lrs}"
    if cfg.schedule_by_time and cfg.max_time_minutes:
        return (
            f"schedule: {lrs} over the {cfg.max_time_minutes:g}-minute budget (at most {t.total_steps} steps)"
        )
    budget = f", at most {cfg.max_time_minutes:g} min" if cfg.max_time_minutes else ""
    return f"schedule: {t.total_steps} steps (≈ {epochs:.2f} epochs), {lrs}{budget}"


def make_monitor(t: Trainer) -> Monitor:
    wandb_run = None
    if t.cfg.wandb_project:
        t.state.wandb_id = t.state.wandb_id or uuid.uuid4().hex[:8]
        config = {"model": t.model_config.to_dict(), "train": t.cfg.to_dict()}
        wandb_run = init_wandb(
            t.cfg.wandb_project, t.cfg.wandb_mode, t.run_dir, config, t.cfg.wandb_run_name, t.state.wandb_id
        )
    # a bar only on a terminal: in a log file its carriage returns are noise beside the log lines
    return Monitor(t.run_dir, t.total_steps, t.state.step, bar=sys.stderr.isatty(), wandb_run=wandb_run)


# ---------------------------------------------------------------------------------------------------------
# end


def finish(t: Trainer, monitor: Monitor | None, reason: str, elapsed_s: float) -> TrainResult:
    """Final evaluation over the whole validation split, samples, checkpoint, plots, summary."""
    if reason == "nonfinite":
        path = save(t)
        raise TrainingDiverged(
            f"the loss was non-finite for {t.state.nonfinite_in_a_row} steps in a row after step {t.state.step}; "
            f"saved {path or t.run_dir}; lower train.lr, raise train.warmup_steps or use precision fp32"
        )
    val = run_eval(t, monitor, None, save_if_best=False)
    texts = run_samples(t, monitor)
    path = save(t, is_best=val["is_best"])
    result = TrainResult(t.run_dir, path, t.state.step, reason, val, texts, elapsed_s)
    if monitor is not None:
        monitor.log({"kind": "event", "step": t.state.step, "event": reason, "elapsed_s": elapsed_s})
        objective(t).plot(t)
        monitor.print(summary(t, result))
    return result


def summary(t: Trainer, r: TrainResult) -> str:
    minutes, seconds = divmod(round(r.elapsed_s), 60)
    best = ckpt.resolve_checkpoint(t.run_dir)  # the `best` link resolves to an absolute path
    if best.is_relative_to(t.run_dir.resolve()):
        best = t.run_dir / best.relative_to(t.run_dir.resolve())
    return "\n".join(
        [
            f"{STOP_MESSAGES[r.reason]} at step {r.step}/{t.total_steps} in {minutes}m{seconds:02d}s",
            *objective(t).final_lines(t, r.val),
            f"saved {r.checkpoint} (best: {best}); plots and metrics.jsonl in {t.run_dir}",
            f"next: deepseek-lm generate --checkpoint {t.run_dir} "
            + ("--chat" if t.data.chat_template is not None else '--prompt "The "'),
        ]
    )
