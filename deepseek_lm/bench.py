"""`deepseek-lm bench`: training and decoding speed, MFU, peak memory and KV-cache size of a preset, optionally
side by side with transformers' `DeepseekV3ForCausalLM` of the same configuration and the same weights.

    deepseek-lm bench                                        the seed preset, ours only
    deepseek-lm bench --compare-hf --json benchmarks/seed-cpu.json
    deepseek-lm bench --preset 100m --compile --batch-size 16 --seq-len 1024    (on a GPU)
    deepseek-lm bench --checkpoint runs/mtp --speculative     MTP self-speculative decoding (bench_speculative.py)

How each figure is measured (SPEC §8; the history of results is in benchmarks/README.md):
- training: one micro-batch step as the trainer runs it (forward with CE + aux loss, backward, gradient
  clipping, fused AdamW, zero_grad, router-bias update), timed per phase. Each implementation lives in its
  own freshly spawned process, so its peak memory is its own: on CPU the RSS high-water mark (reset once the
  libraries are imported) above the RSS at that moment, on CUDA `torch.cuda.max_memory_allocated`. The two
  processes take steps in turn (ours, hf, ours, hf, ...) and each figure is the median over the steps.
- MFU: `flops_per_token(seq_len)` × tokens/s over the matmul peak the bench measures at start.
- decode: greedy generation through each library's own API (our `Engine`, transformers' `generate`).
  t(1) is the prefill plus the first token; decode tokens/s = B·(n − 1) / (t(n) − t(1)), so the prefill is
  reported apart. Ours and transformers alternate per figure and round. With --compile, both decode through
  their compiled paths, each compiled for every figure's shapes before the timed rounds.
- KV cache: bytes per token over all layers; ours from `LatentCache`, transformers' from the tensors its
  `DynamicCache` holds after a prefill.
Ratios are ours / transformers: above 1 is better for speeds, below 1 for memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError

GRAD_CLIP = 1.0  # transformers' Trainer default; only its cost matters here
FIGURES = (  # (key, label, format, better): the table's rows and the JSON keys of each implementation
    ("train_tokens_per_s", "train tokens/s", "{:,.0f}", "higher"),
    ("train_forward_ms", "  forward ms/step", "{:.1f}", "lower"),
    ("train_backward_ms", "  backward ms/step", "{:.1f}", "lower"),
    ("train_optimizer_ms", "  optimizer ms/step", "{:.1f}", "lower"),
    ("mfu", "train MFU", "{:.1%}", "higher"),
    ("train_peak_mem_mb", "train peak memory MB", "{:,.0f}", "lower"),
    ("train_peak_rss_mb", "  peak RSS of the process MB", "{:,.0f}", "lower"),
    ("decode_tokens_per_s_b1", "decode tokens/s, b1, prompt {prompt}", "{:,.0f}", "higher"),
    ("decode_tokens_per_s_b8", "decode tokens/s, b8, prompt {prompt}", "{:,.0f}", "higher"),
    ("decode_tokens_per_s_b1_ctx2k", "decode tokens/s, b1, context {ctx}", "{:,.0f}", "higher"),
    ("prefill_ms_ctx2k", "  prefill {ctx_prompt} tokens ms", "{:,.1f}", "lower"),
    ("kv_cache_bytes_per_token", "KV cache bytes/token (all layers)", "{:,.0f}", "lower"),
)


@dataclass
class BenchConfig:
    preset: str = "seed"
    compare_hf: bool = False
    json: str | None = None
    device: str = "auto"
    compile: bool = False
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    steps: int = 4
    warmup: int = 2
    rounds: int = 5
    prompt_len: int = 32
    new_tokens: int = 128
    decode_batch: int = 8
    ctx_len: int = 2048
    ctx_new_tokens: int = 64
    seed: int = 0
    threads: int = 0
    checkpoint: str | None = None
    speculative: bool = False
    draft_tokens: int = 1
    data_dir: str | None = None


HELP = {  # the command line's help, by BenchConfig field
    "preset": "model preset: tiny, seed, 100m, 1b",
    "compare_hf": "also measure transformers' DeepseekV3ForCausalLM, alternating with ours",
    "json": "write the results to this JSON file",
    "device": "auto, cpu or cuda",
    "compile": "torch.compile both implementations: each block for training; for decoding our "
    "Engine(compile=True) and transformers' generate with a static cache and its compile config",
    "batch_size": "training micro-batch (rows)",
    "seq_len": "training sequence length",
    "grad_accum": "micro-batches per optimizer step (the trainer's accumulation)",
    "steps": "timed training steps per implementation and round (the implementations alternate per step)",
    "warmup": "untimed training steps per round",
    "rounds": "rounds of training steps and of decode figures; figures are medians",
    "prompt_len": "prompt length of the short-prompt decode figures",
    "new_tokens": "tokens decoded after the short prompt",
    "decode_batch": "rows of the batched decode figure",
    "ctx_len": "the long-context decode fills this many positions (prompt = ctx_len - ctx_new_tokens)",
    "ctx_new_tokens": "tokens decoded in the long-context figure",
    "seed": "seed of the weights and the token ids",
    "threads": "torch threads in every process (0: torch's default, one per core)",
    "checkpoint": "with --speculative: a trained checkpoint (or run directory) with an MTP module",
    "speculative": "self-speculative decoding against plain decoding on --checkpoint: tokens/s at batch 1 "
    "and --decode-batch, acceptance rate (bench_speculative.py)",
    "draft_tokens": "with --speculative: tokens drafted per round",
    "data_dir": "with --speculative: prepared data whose validation split gives the prompts (default: the "
    "checkpoint's training data)",
}


# ---------------------------------------------------------------------------------------------------------
# command line


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="deepseek-lm bench", description=__doc__.split("\n\n")[0], exit_on_error=False
    )
    for name, default in asdict(BenchConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=HELP[name])
        else:
            kind = type(default) if default is not None else str | None
            parser.add_argument(flag, type=kind, default=default, help=HELP[name])
    return parser


def parse(argv: list[str]) -> BenchConfig:
    from deepseek_lm.cli import parse_args

    ns = parse_args(build_parser(), argv)
    cfg = BenchConfig(**{k: ns[k] for k in asdict(BenchConfig())})
    for name in [
        "batch_size",
        "seq_len",
        "grad_accum",
        "steps",
        "rounds",
        "prompt_len",
        "new_tokens",
        "decode_batch",
    ]:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(cfg, name)})")
    if cfg.warmup < 0 or cfg.threads < 0:
        raise UserError("--warmup and --threads must be >= 0")
    DeepSeekConfig.from_preset(cfg.preset)  # an unknown preset is a ConfigError (a UserError)
    if cfg.ctx_new_tokens < 2 or cfg.new_tokens < 2:
        raise UserError("--new-tokens and --ctx-new-tokens must be >= 2 (decode speed needs two lengths)")
    if cfg.speculative != (cfg.checkpoint is not None):
        raise UserError(
            "--speculative needs --checkpoint DIR (a trained model with an MTP module), and --checkpoint is "
            "only for --speculative (the other figures use a preset's random weights)"
        )
    if cfg.draft_tokens < 1:
        raise UserError(f"--draft-tokens must be >= 1 (got {cfg.draft_tokens})")
    return cfg


def main(argv: list[str]) -> int:
    try:
        cfg = parse(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if cfg.speculative:
        from deepseek_lm import bench_speculative

        result, table = bench_speculative.run(cfg, _log), bench_speculative.format_table
    else:
        result, table = run_bench(cfg), format_table
    print(table(result))
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {path}")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# the run


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Measure every figure of `cfg`; -> {"ours", "hf" (None without compare_hf), "ratio", "machine", "settings"}."""
    device = _device(cfg.device)
    config = DeepSeekConfig.from_preset(cfg.preset)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.compare_hf:
        _require_transformers()
    impls = ["ours", "hf"] if cfg.compare_hf else ["ours"]
    machine = machine_info(device)
    peak = matmul_peak(device)
    log(f"matmul peak {peak / 1e9:,.0f} GFLOP/s ({_train_dtype(device)}); load {machine['load_avg_1m']:.1f}")
    from deepseek_lm.model import get_model

    torch.manual_seed(cfg.seed)
    state = get_model(config).state_dict()
    with tempfile.TemporaryDirectory(prefix="deepseek-lm-bench-") as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(state, weights)
        train = measure_training(cfg, config, weights, device, impls, log)
    decode = measure_decoding(cfg, config, state, device, impls, log)
    flops = get_model_flops(config, cfg.seq_len)
    results = {impl: {**train[impl], **decode[impl]} for impl in impls}
    for r in results.values():
        r["mfu"] = r["train_tokens_per_s"] * flops / peak
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    ours, hf = results["ours"], results.get("hf")
    ratio = {k: ours[k] / hf[k] for k in ours if hf and hf.get(k)} if hf else None
    settings = {
        **asdict(cfg),
        "matmul_peak_flops": peak,
        "flops_per_token": flops,
        "dtype": _train_dtype(device),
    }
    settings["model"] = config.to_dict()
    if hf:
        settings["hf_implementation"] = hf.pop("implementation")
    return {"ours": ours, "hf": hf, "ratio": ratio, "machine": machine, "settings": settings}


def get_model_flops(config: DeepSeekConfig, seq_len: int) -> int:
    from deepseek_lm.model import DeepSeekLM

    with torch.device("meta"):
        return DeepSeekLM(config).flops_per_token(seq_len)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available; use cpu or auto")
    return torch.device(name)


def _train_dtype(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("--compare-hf needs transformers: pip install transformers") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, repeats: int = 8) -> float:
    """FLOP/s of the best of a few large square matmuls: fp32 on CPU, bf16 on CUDA (what training uses)."""
    from deepseek_lm.train.monitor import measure_matmul_peak

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return measure_matmul_peak(device, dtype, trials=repeats)


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg_1m": os.getloadavg()[0],
        **_git_commit(),
    }
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    return info


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def _git_commit() -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):  # not a checkout (a copied tree): the caller may say
        return {"commit": os.environ.get("DEEPSEEK_LM_COMMIT"), "dirty": None}
    return {"commit": commit, "dirty": dirty}


# ---------------------------------------------------------------------------------------------------------
# training: one fresh process per (implementation, round)


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
        model, optimizer = _build_training(job["impl"], config, state, device, job["compile"])
        del state
        g = torch.Generator().manual_seed(job["seed"])
        ids = torch.randint(0, config.vocab_size, (job["batch_size"], job["seq_len"] + 1), generator=g)
        x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)
        for _ in range(job["warmup"]):
            _train_step(job["impl"], model, optimizer, x, y, device, job["accum"])
        impl = None
        if job["impl"] == "hf":
            impl = {"attn": model.config._attn_implementation,
                    "experts": getattr(model.config, "_experts_implementation", None)}  # fmt: skip
        conn.send(("ok", {"base_mb": base_mb, "implementation": impl}))
        while (n := conn.recv()) != "finish":
            times = [_train_step(job["impl"], model, optimizer, x, y, device, job["accum"]) for _ in range(n)]
            conn.send(("ok", times))
        peak_mb, peak_rss_mb = _peak_memory(device, base_mb)
        conn.send(("ok", {"peak_mb": peak_mb, "peak_rss_mb": peak_rss_mb}))
    except Exception:
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _build_training(impl: str, config: DeepSeekConfig, state: dict, device: torch.device, compile: bool):
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


def _train_step(impl: str, model, optimizer, x, y, device, accum: int = 1) -> tuple[float, float, float]:
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
        _sync(device)
        t1 = time.perf_counter()
        (loss / accum).backward()
        _sync(device)
        fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if impl == "ours":
        model.update_router_biases(counts)
    _sync(device)
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


# ---------------------------------------------------------------------------------------------------------
# decoding: both models in this process, alternating


def load_ours(config: DeepSeekConfig, state: dict, device: torch.device, dtype: torch.dtype | None = None):
    from deepseek_lm.model import get_model

    model = get_model(config, device=device)
    model.load_state_dict(state)
    return model.to(dtype) if dtype is not None else model


def load_hf(config: DeepSeekConfig, state: dict, device: torch.device, dtype: torch.dtype | None = None):
    """transformers' DeepseekV3ForCausalLM with its default attention and experts implementations."""
    import transformers

    from deepseek_lm.interop import to_hf_config
    from deepseek_lm.model.hf_names import to_hf_state_dict

    transformers.logging.set_verbosity_error()  # no deprecation chatter in the table
    hf_config = transformers.DeepseekV3Config.from_dict(to_hf_config(config))
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM._from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(state), strict=False)
    if unexpected or [k for k in missing if "rotary_emb" not in k]:  # rope tables are not weights
        raise RuntimeError(f"weights do not map onto transformers' model: {(missing + unexpected)[:3]}")
    model.generation_config.eos_token_id = None  # decode exactly n tokens
    return model.to(dtype) if dtype is not None else model


def measure_decoding(cfg, config, state: dict, device, impls: list[str], log) -> dict[str, dict[str, Any]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runners = {impl: _decoder(impl, config, state, device, dtype, cfg.compile) for impl in impls}
    ctx = min(cfg.ctx_len, config.max_position_embeddings)
    g = torch.Generator().manual_seed(cfg.seed)
    figures = {  # name -> (prompt ids (B, T), new tokens)
        "b1": (torch.randint(0, config.vocab_size, (1, cfg.prompt_len), generator=g), cfg.new_tokens),
        "b8": (torch.randint(0, config.vocab_size, (cfg.decode_batch, cfg.prompt_len), generator=g), cfg.new_tokens),
        "b1_ctx2k": (torch.randint(0, config.vocab_size, (1, ctx - cfg.ctx_new_tokens), generator=g), cfg.ctx_new_tokens),
    }  # fmt: skip
    # warm up: first calls pay for allocations and kernel selection, compiled ones for every new shape
    warmup = list(figures.values()) if cfg.compile else [(figures["b1"][0], 2)]
    for run in runners.values():
        for ids, n in warmup:
            run(ids.to(device), n)
            run(ids.to(device), 1)
    samples = {impl: {name: [] for name in figures} for impl in impls}
    for r in range(cfg.rounds):
        for name, (ids, n) in figures.items():
            for impl in impls:
                samples[impl][name].append(_decode_once(runners[impl], ids.to(device), n))
        log(f"decode round {r + 1}/{cfg.rounds}: " + ", ".join(
            f"{impl} {name} {samples[impl][name][-1][1]:,.0f} tok/s" for name in figures for impl in impls))  # fmt: skip
    out = {}
    for impl in impls:
        s = samples[impl]
        out[impl] = {
            f"decode_tokens_per_s_{name}": statistics.median(v[1] for v in s[name]) for name in figures
        }
        out[impl]["prefill_ms_ctx2k"] = statistics.median(v[0] for v in s["b1_ctx2k"]) * 1e3
        out[impl]["kv_cache_bytes_per_token"] = _kv_bytes(impl, runners[impl].model, device)
    return out


def _decode_once(run, ids: torch.Tensor, n: int) -> tuple[float, float]:
    """-> (seconds of prefill + first token, decode tokens/s over the n - 1 tokens after it)."""
    t1 = run(ids, 1)
    tn = run(ids, n)
    return t1, ids.shape[0] * (n - 1) / max(tn - t1, 1e-9)


def _decoder(impl: str, config, state, device, dtype, compile: bool) -> Callable[[torch.Tensor, int], float]:
    """A function (prompt ids (B, T), n) -> seconds to generate n tokens greedily; `.model` is the model."""
    if impl == "ours":
        from deepseek_lm.generate.engine import Engine
        from deepseek_lm.generate.sampling import SamplingConfig

        model = load_ours(config, state, device, dtype).eval()
        engine, greedy = Engine(model, compile=compile), SamplingConfig(temperature=0.0)

        def generate(ids: torch.Tensor) -> None:
            engine.generate_ids(ids.tolist(), n_tokens[0], sampling=greedy)
    else:
        model = load_hf(config, state, device, dtype).eval()
        compiled = _hf_compiled_generation(device) if compile else {}

        @torch.inference_mode()
        def generate(ids: torch.Tensor) -> None:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens[0],
                           min_new_tokens=n_tokens[0], do_sample=False, pad_token_id=0, **compiled)  # fmt: skip

    n_tokens = [1]

    def run(ids: torch.Tensor, n: int) -> float:
        n_tokens[0] = n
        _sync(device)
        t0 = time.perf_counter()
        generate(ids)
        _sync(device)
        return time.perf_counter() - t0

    run.model = model  # type: ignore[attr-defined]
    return run


def _hf_compiled_generation(device: torch.device) -> dict[str, Any]:
    """`generate` keywords for transformers' compiled decoding: a static cache, whose forward transformers
    compiles itself (mode reduce-overhead: CUDA graphs on a GPU); on a CPU only when asked to."""
    from transformers import CompileConfig

    compile_config = CompileConfig()
    compile_config._compile_all_devices = device.type == "cpu" or None  # a flag, not an init argument
    # every figure's shapes compile once each (transformers recompiles per cache length): keep them all
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return dict(cache_implementation="static", compile_config=compile_config)


@torch.inference_mode()
def _kv_bytes(impl: str, model, device: torch.device, n: int = 16) -> int:
    """Bytes per token over all layers: ours from the cache layout, transformers' from its filled cache."""
    if impl == "ours":
        return model.new_cache(1, n).bytes_per_token()
    ids = torch.zeros(1, n, dtype=torch.long, device=device)
    cache = model(ids, use_cache=True).past_key_values
    held = [getattr(layer, a) for layer in cache.layers for a in ("keys", "values")]
    return sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor)) // n


# ---------------------------------------------------------------------------------------------------------
# output


def format_table(result: dict[str, Any]) -> str:
    s, m, ours, hf, ratio = (result[k] for k in ("settings", "machine", "ours", "hf", "ratio"))
    model = DeepSeekConfig.from_dict(s["model"])
    ctx_prompt = min(s["ctx_len"], model.max_position_embeddings) - s["ctx_new_tokens"]
    names = dict(prompt=s["prompt_len"], ctx=ctx_prompt + s["ctx_new_tokens"], ctx_prompt=ctx_prompt)
    lines = [
        f"deepseek-lm bench: preset {s['preset']}, {s['dtype']}, train batch {s['batch_size']} × {s['seq_len']}"
        + (f" × {s['grad_accum']} micro-batches" if s.get("grad_accum", 1) > 1 else "")
        + (", torch.compile" if s.get("compile") else ", eager"),
        f"machine: {m['cpu']} ({m['cores']} cores), device {m['device']}, torch {m['torch']}, "
        f"commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, {m['date']}",
        f"matmul peak {s['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s; load average {m['load_avg_1m']:.1f} → "
        f"{m['load_avg_1m_end']:.1f}; {s['rounds']} rounds, medians",
        "",
    ]
    header = f"{'':<38}{'ours':>12}" + (f"{'transformers':>14}{'ours/hf':>10}" if hf else "")
    lines += [header, "-" * len(header)]
    for key, label, fmt, _ in FIGURES:
        row = f"{label.format(**names):<38}{fmt.format(ours[key]):>12}"
        if hf:
            row += f"{fmt.format(hf[key]):>14}" + (f"{ratio[key]:>9.2f}×" if key in ratio else f"{'':>10}")
        lines.append(row)
    values = model.kv_lora_rank + model.qk_rope_head_dim
    lines.append(f"(KV cache: kv_lora_rank + qk_rope_head_dim = {values} values per token per layer)")
    if m["device"] == "cpu" and m["torch_threads"] > 1 and max(m["load_avg_1m"], m["load_avg_1m_end"]) > 0.5:
        lines.append(
            "note: other work was running. A multi-threaded op waits for its slowest thread, and a thread whose "
            "core is busy can wait a whole scheduler slice: such timings swing widely. --threads 1 is steadier."
        )
    return "\n".join(lines)
