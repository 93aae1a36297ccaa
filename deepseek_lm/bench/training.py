"""Training throughput and peak memory: one fresh process per implementation, stepping in turn."""

from __future__ import annotations

import contextlib
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from deepseek_lm.bench.hf import load_hf
from deepseek_lm.bench.machine import sync
from deepseek_lm.bench.ours import load_ours
from deepseek_lm.config import DeepSeekConfig

GRAD_CLIP = 1.0  # transformers' Trainer default; only its cost matters here


def measure_training(cfg, config, weights: Path, device, impls: list[str], log) -> dict[str, dict[str, Any]]:
    """One fresh process per implementation, both alive and stepping in turn (ours, hf, ours, hf, ...): a
    busy machine slows both alike, and each process's peak memory is its own."""
    tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    job = dict(config=config.to_dict(), weights=str(weights), device=str(device), compile=cfg.compile,
               threads=cfg.threads, batch_size=cfg.batch_size, seq_len=cfg.seq_len, warmup=cfg.warmup, accum=cfg.grad_accum,
               seed=cfg.seed)  # fmt: skip
    workers: dict[str, _TrainProcess] = {}
    ready: dict[str, dict[str, Any]] = {}
    try:
        for impl in impls:  # built and warmed up one after the other, never side by side
            workers[impl] = _TrainProcess({**job, "impl": impl})
            ready[impl] = workers[impl].call()
            log(f"train {impl}: built and warmed up; memory baseline {ready[impl]['base_mb']:,.0f} MB")
        times: dict[str, list] = {impl: [] for impl in impls}
        for r in range(cfg.rounds):
            for _ in range(cfg.steps):  # step by step: the neighbours' load drifts within seconds
                for impl in impls:
                    times[impl] += workers[impl].call(1)
            log(f"train round {r + 1}/{cfg.rounds}: " + ", ".join(
                f"{impl} {tokens / statistics.median(map(sum, times[impl][-cfg.steps:])):,.0f} tokens/s"
                for impl in impls))  # fmt: skip
        finals = {impl: {**ready[impl], **workers[impl].call("finish")} for impl in impls}
    finally:
        for worker in workers.values():
            worker.close()
    return {impl: _train_summary(times[impl], finals[impl], tokens) for impl in impls}


def _train_summary(times: list[tuple[float, float, float]], final: dict[str, Any], tokens: int) -> dict:
    """Medians over all timed steps of the step and of each phase; the process's peak memory."""
    out = {
        "train_tokens_per_s": tokens / statistics.median(map(sum, times)),
        "train_forward_ms": statistics.median(t[0] for t in times) * 1e3,
        "train_backward_ms": statistics.median(t[1] for t in times) * 1e3,
        "train_optimizer_ms": statistics.median(t[2] for t in times) * 1e3,
        "train_peak_mem_mb": final["peak_mb"],
        "train_peak_rss_mb": final["peak_rss_mb"],
    }
    if final.get("implementation"):
        out["implementation"] = final["implementation"]
    return out


class _TrainProcess:
    """A spawned process that builds one implementation, then runs n training steps per request n."""

    def __init__(self, job: dict[str, Any]) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.impl = job["impl"]
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_train_worker, args=(child_conn, job), name=f"bench-{self.impl}")
        self.process.start()
        child_conn.close()

    def call(self, command: str | int | None = None) -> Any:
        if command is not None:
            self.conn.send(command)
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(
                f"the {self.impl} training process died (exit code {self.process.exitcode})"
            ) from None
        if kind == "error":
            raise RuntimeError(f"the {self.impl} training process failed:\n{payload}")
        return payload

    def close(self) -> None:
        self.conn.close()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def _train_worker(conn, job: dict[str, Any]) -> None:
    """In a fresh process: build the model and optimizer, warm up, answer a request n with the phase times
    of n steps, and "finish" with the peak memory."""
    try:
        device = torch.device(job["device"])
        if job["threads"]:
            torch.set_num_threads(job["threads"])
        config = DeepSeekConfig.from_dict(job["config"])
        if job["impl"] == "hf":
            import transformers  # noqa: F401  imported before the baseline: a library is not training memory
        import deepseek_lm.model  # noqa: F401  (likewise)

        base_mb = _reset_peak_memory(device)
        state = torch.load(job["weights"], weights_only=True)
        model, optimizer = build_training(job["impl"], config, state, device, job["compile"])
        del state
        g = torch.Generator().manual_seed(job["seed"])
        ids = torch.randint(0, config.vocab_size, (job["batch_size"], job["seq_len"] + 1), generator=g)
        x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)
        for _ in range(job["warmup"]):
            train_step(job["impl"], model, optimizer, x, y, device, job["accum"])
        impl = None
        if job["impl"] == "hf":
            impl = {"attn": model.config._attn_implementation,
                    "experts": getattr(model.config, "_experts_implementation", None)}  # fmt: skip
        conn.send(("ok", {"base_mb": base_mb, "implementation": impl}))
        while (n := conn.recv()) != "finish":
            times = [train_step(job["impl"], model, optimizer, x, y, device, job["accum"]) for _ in range(n)]
            conn.send(("ok", times))
        peak_mb, peak_rss_mb = _peak_memory(device, base_mb)
        conn.send(("ok", {"peak_mb": peak_mb, "peak_rss_mb": peak_rss_mb}))
    except Exception:
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def build_training(impl: str, config: DeepSeekConfig, state: dict, device: torch.device, compile: bool):
    """-> (model in train mode, optimizer): ours with the trainer's optimizer; transformers with what its
    `Trainer` uses by default on torch >= 2.8 (AdamW, fused=True), same hyperparameters."""
    if impl == "ours":
        from deepseek_lm.train.config import TrainConfig
        from deepseek_lm.train.optim import build_optimizer

        model = load_ours(config, state, device).train()
        blocks = model.layers
        optimizer = build_optimizer(model, TrainConfig(), device.type)
    else:
        model = load_hf(config, state, device).train()
        blocks = model.model.layers
        tc = _train_defaults()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
            weight_decay=tc.weight_decay, fused=device.type in ("cpu", "cuda"),
        )  # fmt: skip
    if compile:
        for block in blocks:
            block.compile()
    return model, optimizer


def _train_defaults():
    from deepseek_lm.train.config import TrainConfig

    return TrainConfig()


def train_step(impl: str, model, optimizer, x, y, device, accum: int = 1) -> tuple[float, float, float]:
    """One optimizer step over `accum` micro-batches -> (forward, backward, optimizer) seconds."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    fwd = bwd = 0.0
    counts = None
    for _ in range(accum):
        t0 = time.perf_counter()
        with autocast:
            if impl == "ours":
                out = model(x, targets=y)
                loss = out.loss + out.aux_loss
                step_counts = [s.counts for s in out.router_stats]
                counts = step_counts if counts is None else [a + b for a, b in zip(counts, step_counts)]
            else:  # transformers shifts the labels itself: same T predictions per row
                loss = model(input_ids=x, labels=x).loss
        sync(device)
        t1 = time.perf_counter()
        (loss / accum).backward()
        sync(device)
        fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if impl == "ours":
        model.update_router_biases(counts)
    sync(device)
    return fwd, bwd, time.perf_counter() - t2


def _proc_status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_memory(device: torch.device) -> float:
    """Start counting the peak here; -> the baseline in MB (RSS on CPU, allocated bytes on CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):  # Linux ≥ 4.0: "5" resets the RSS high-water mark to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    rss = _proc_status_kb("VmRSS")
    if rss is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return rss / 2**10


def _peak_memory(device: torch.device, base_mb: float) -> tuple[float, float]:
    """-> (peak above the baseline, peak of the process) in MB."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return peak - base_mb, peak
    hwm = _proc_status_kb("VmHWM")
    if hwm is None:  # without /proc: ru_maxrss (kB on Linux, bytes on macOS), not reset after the imports
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10
    else:
        peak = hwm / 2**10
    return peak - base_mb, peak
