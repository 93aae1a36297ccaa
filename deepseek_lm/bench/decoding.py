"""Decode throughput (batch 1, a batch, a long context), the prefill, and KV-cache bytes per token: both
implementations in this process, alternating per figure and round."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from deepseek_lm.bench.hf import compiled_generation, load_hf
from deepseek_lm.bench.machine import sync
from deepseek_lm.bench.ours import load_ours


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
    # warm up every figure: first calls pay for allocations and kernel selection, compiled steps (ahead of
    # time too, our default on a CPU) for every new batch size or shape
    warmup = list(figures.values())
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
        compiled = compiled_generation(device) if compile else {}

        @torch.inference_mode()
        def generate(ids: torch.Tensor) -> None:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens[0],
                           min_new_tokens=n_tokens[0], do_sample=False, pad_token_id=0, **compiled)  # fmt: skip

    n_tokens = [1]

    def run(ids: torch.Tensor, n: int) -> float:
        n_tokens[0] = n
        sync(device)
        t0 = time.perf_counter()
        generate(ids)
        sync(device)
        return time.perf_counter() - t0

    run.model = model  # type: ignore[attr-defined]
    return run


@torch.inference_mode()
def _kv_bytes(impl: str, model, device: torch.device, n: int = 16) -> int:
    """Bytes per token over all layers: ours from the cache layout, transformers' from its filled cache."""
    if impl == "ours":
        return model.new_cache(1, n).bytes_per_token()
    ids = torch.zeros(1, n, dtype=torch.long, device=device)
    cache = model(ids, use_cache=True).past_key_values
    held = [getattr(layer, a) for layer in cache.layers for a in ("keys", "values")]
    return sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor)) // n
