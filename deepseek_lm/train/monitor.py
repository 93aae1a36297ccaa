"""Monitoring: progress bar, log window and log lines, `metrics.jsonl` (always), W&B (when asked), resources, MFU.

Only the main process (rank 0) creates a `Monitor`; the others log nothing. One record per line in
`metrics.jsonl`, each with `kind` ("train" | "eval" | "sample" | "event") and `step`, so plots and tests read
the file back without any other state.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import torch

from deepseek_lm.model import onednn
from deepseek_lm.train.step_result import StepResult

if TYPE_CHECKING:
    from deepseek_lm.train.trainer import Trainer

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def truncate_metrics(run_dir: str | Path, after_step: int) -> None:
    """Drop records logged after `after_step`: on resume they are about to be produced again."""
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= after_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------------------------------------------------
# resources and MFU


def resource_usage(process: psutil.Process, device: torch.device) -> dict[str, float]:
    usage = {
        "cpu_percent": process.cpu_percent(),  # since the previous call; can exceed 100 with several threads
        "rss_gb": process.memory_info().rss / 2**30,
    }
    if device.type == "cuda":
        usage["gpu_mem_gb"] = torch.cuda.memory_allocated(device) / 2**30
        usage["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        with contextlib.suppress(Exception):  # needs pynvml / NVML; not on every machine
            usage["gpu_util"] = float(torch.cuda.utilization(device))
    return usage


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, n: int | None = None, trials: int = 3
) -> float:
    """A quick achieved-matmul FLOP/s on `device` (the MFU denominator when no peak is given): the best of
    a few timings, since other processes only ever make a trial slower. The default size is large enough to
    reach the device's peak (a 1024² product reaches a tenth of an H200's), small enough for a CPU. On a CPU
    also through oneDNN, and the faster of the two: MKL runs its AVX2 kernels on AMD's processors, oneDNN the
    widest the core has (model/onednn.py; ~110 against ~250 GFLOP/s on the dev VM's EPYC)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    products = [lambda: torch.mm(a, b)]
    packed = onednn.pack(b.t(), n) if device.type == "cpu" else None
    if packed is not None:
        products.append(lambda: onednn.mm(a, packed))
    best = math.inf
    for product in products:
        product()  # warm-up: kernel selection, allocation, page faults
        for _ in range(trials):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            product()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------------------
# Weights & Biases


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_wandb(project: str, mode: str, run_dir: Path, config: dict, name: str | None, run_id: str | None):
    """A wandb run that never prompts: online without an API key falls back to offline, with a warning."""
    os.environ.setdefault("WANDB_SILENT", "true")
    mode = os.environ.get("WANDB_MODE", mode)
    if mode == "online" and not _has_wandb_key():
        warnings.warn("no W&B API key (WANDB_API_KEY or `wandb login`): logging offline", stacklevel=2)
        mode = "offline"
    import wandb

    settings = wandb.Settings(silent=True, console="off", login_timeout=10)
    return wandb.init(
        project=project, mode=mode, dir=str(run_dir), config=config, name=name,
        id=run_id, resume="allow", settings=settings,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# the monitor


class Monitor:
    """Everything the main process reports: bar, log lines, metrics.jsonl, wandb."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, *, bar: bool = True, wandb_run=None):
        from tqdm.auto import tqdm

        self.run_dir = run_dir
        self.metrics = open(run_dir / METRICS_FILE, "a")  # noqa: SIM115 (closed in close())
        self.wandb = wandb_run
        self.process = psutil.Process()
        self.process.cpu_percent()  # start the CPU-time window
        self.bar = tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not bar
        )

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(_flatten(record, record["kind"]), step=record["step"])

    def print(self, text: str) -> None:
        self.bar.write(text)

    def advance(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.bar.n = step
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """`{"loss": 2.1, "expert_load": [[.2, .3], ...]}` → `{"train/loss": 2.1, "train/expert_load/0/1": .3, ...}`."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "kind"):
            continue
        if isinstance(value, (list, tuple)):
            flat.update(_flatten({str(i): v for i, v in enumerate(value)}, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[f"{prefix}/{key}"] = value
    return flat


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    return loss_nats_per_token / math.log(2) / bytes_per_token


# ---------------------------------------------------------------------------------------------------------
# the log window


class Window:
    """Sums over the steps since the last log record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.loss = self.aux = self.grad_norm = self.lr = 0.0
        self.counts_LE: torch.Tensor | None = None
        self.dropped_L: torch.Tensor | None = None
        self.entropy_L: torch.Tensor | None = None
        self.mtp_K: np.ndarray | None = None  # per MTP depth: Σ loss, Σ top-1 hits, Σ targets
        self.mtp_weight = 0.0
        self.metrics: dict[str, float] = {}  # the objective's own (StepResult.metrics), summed

    def add(self, r: StepResult) -> None:
        self.steps += 1
        self.loss += r.loss
        self.aux += r.aux_loss
        self.grad_norm += r.grad_norm
        self.lr = r.lr  # the window's last
        for key, value in r.metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value
        if r.mtp_loss_K:
            mtp = np.array([r.mtp_loss_K, r.mtp_top1_K, r.mtp_tokens_K])
            self.mtp_K = mtp if self.mtp_K is None else self.mtp_K + mtp
            self.mtp_weight = r.mtp_weight
        if r.counts_LE is not None:
            first = self.counts_LE is None
            self.counts_LE = r.counts_LE.clone() if first else self.counts_LE + r.counts_LE
            self.dropped_L = r.dropped_L.clone() if first else self.dropped_L + r.dropped_L
            self.entropy_L = r.entropy_L.clone() if first else self.entropy_L + r.entropy_L

    def step_time(self) -> float:
        return (time.perf_counter() - self.start) / max(self.steps, 1)

    def record(self, t: Trainer, peak_flops: float | None) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        tokens_per_s = self.steps * t.tokens_per_step / elapsed
        loss = self.loss / self.steps
        record = {
            "kind": "train",
            "step": t.state.step,
            "loss": loss,
            "aux_loss": self.aux / self.steps,
            "lr": self.lr,
            "grad_norm": self.grad_norm / self.steps,
            "tokens": t.state.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed / self.steps,
        } | {key: value / self.steps for key, value in self.metrics.items()}
        if peak_flops:
            flops = t.raw_model.flops_per_token(t.cfg.seq_len) * tokens_per_s
            record["mfu"] = flops / (peak_flops * t.dist.world_size)
        if self.counts_LE is not None:
            record.update(
                expert_stats(self.counts_LE, self.dropped_L / self.steps, self.entropy_L / self.steps)
            )
        if self.mtp_K is not None:  # per depth: mean loss, and the share of targets that were the argmax
            record["mtp_loss"] = (self.mtp_K[0] / self.steps).tolist()
            record["mtp_top1"] = (self.mtp_K[1] / np.maximum(self.mtp_K[2], 1)).tolist()
            record["mtp_weight"] = self.mtp_weight
        return record


def expert_stats(counts_LE: torch.Tensor, dropped_L: torch.Tensor, entropy_L: torch.Tensor) -> dict[str, Any]:
    share_LE = counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp(min=1)
    return {
        "expert_load": share_LE.tolist(),
        # max / mean load per layer: 1.0 is perfectly balanced, E means one expert takes everything
        "load_imbalance": (share_LE.max(dim=1).values * share_LE.shape[1]).tolist(),
        "dropped_frac": dropped_L.tolist(),
        "router_entropy": entropy_L.tolist(),
    }


# ---------------------------------------------------------------------------------------------------------
# log lines


def format_train(r: dict[str, Any], total_steps: int, show_mfu: bool = True) -> str:
    """One log line. MFU is left out on a CPU without a given peak: a shared CPU's measured matmul peak
    drifts with the load, so the ratio is noise there (metrics.jsonl still has it)."""
    parts = [
        f"step {r['step']:>{len(str(total_steps))}}/{total_steps}",
        f"loss {r['loss']:.4f}",
        f"{r['bits_per_byte']:.3f} bits/byte",
        f"lr {r['lr']:.2e}",
        f"{r['tokens_per_s']:,.0f} tok/s",
    ]
    if show_mfu and "mfu" in r:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if "load_imbalance" in r:
        parts.append(f"expert load max/mean {max(r['load_imbalance']):.2f}")
    if "mtp_loss" in r:
        parts.append(format_mtp(r))
    return " | ".join(parts)


def format_mtp(r: dict[str, Any]) -> str:
    """`mtp loss 4.51 top-1 38.2%`, depths separated by ' / ' (top-1: the draft's agreement with the next
    token, an estimate of speculative decoding's acceptance rate)."""
    loss = " / ".join(f"{v:.3f}" for v in r["mtp_loss"])
    top1 = " / ".join(f"{100 * v:.1f}%" for v in r["mtp_top1"])
    return f"mtp loss {loss} top-1 {top1}"


def format_eval(m: dict[str, Any], baselines: dict[str, float], step: int) -> str:
    """One line; `baselines` ({"xz -9": 1.937, "zpaq -m5": 1.511}) in parentheses after the bits per byte."""
    bars = ", ".join(f"{name}: {value:.3f}" for name, value in baselines.items())
    mtp = f" | {format_mtp(m)}" if "mtp_loss" in m else ""
    return (
        f"eval step {step}: val loss {m['loss']:.4f} | perplexity {m['perplexity']:.1f} | "
        f"{m['bits_per_byte']:.3f} bits/byte{f' ({bars})' if bars else ''}{mtp}"
    )
