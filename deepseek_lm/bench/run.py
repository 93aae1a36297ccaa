"""One bench run: the machine, the matmul peak, training in fresh processes, then decoding; -> the result
that the table prints and the JSON holds."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from deepseek_lm.bench.config import BenchConfig
from deepseek_lm.bench.decoding import measure_decoding
from deepseek_lm.bench.hf import require_transformers
from deepseek_lm.bench.machine import machine_info, matmul_peak, pick_device, train_dtype
from deepseek_lm.bench.training import measure_training
from deepseek_lm.config import DeepSeekConfig


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Measure every figure of `cfg`; -> {"ours", "hf" (None without compare_hf), "ratio", "machine", "settings"}."""
    device = pick_device(cfg.device)
    config = DeepSeekConfig.from_preset(cfg.preset)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.compare_hf:
        require_transformers()
    impls = ["ours", "hf"] if cfg.compare_hf else ["ours"]
    machine = machine_info(device)
    peak = matmul_peak(device)
    log(f"matmul peak {peak / 1e9:,.0f} GFLOP/s ({train_dtype(device)}); load {machine['load_avg_1m']:.1f}")
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
        "dtype": train_dtype(device),
    }
    settings["model"] = config.to_dict()
    if hf:
        settings["hf_implementation"] = hf.pop("implementation")
    return {"ours": ours, "hf": hf, "ratio": ratio, "machine": machine, "settings": settings}


def get_model_flops(config: DeepSeekConfig, seq_len: int) -> int:
    from deepseek_lm.model import DeepSeekLM

    with torch.device("meta"):
        return DeepSeekLM(config).flops_per_token(seq_len)
