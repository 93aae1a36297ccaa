"""Where a training step or a decode step spends its time: torch.profiler's top operations.

    python benchmarks/profile_step.py --preset seed                       # a CPU training step
    python benchmarks/profile_step.py --preset seed --what decode         # greedy tokens at batch 1, by part
    python benchmarks/profile_step.py --preset 1b --compile --batch_size 8 --seq_len 2048   # on a GPU

Uses the bench's own step (deepseek_lm.bench), so the profile is of what `deepseek-lm bench` times.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from deepseek_lm.bench.ours import load_ours
from deepseek_lm.bench.training import build_training, train_step
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model import get_model


def top_ops(prof, device: torch.device, n: int) -> str:
    """The n operations with the most self time (device time on CUDA), with their share."""
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    lines = [f"self time {total / 1e3:,.1f} ms ({'device' if device.type == 'cuda' else 'cpu'})"]
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:n]:
        t = getattr(e, attr)
        lines.append(f"{t / 1e3:10.1f} ms {100 * t / total:5.1f} %  {e.count:6d} calls  {e.key[:70]}")
    return "\n".join(lines)


def profile_training(config, device, batch_size, seq_len, compile, steps):
    torch.manual_seed(0)
    model, optimizer = build_training("ours", config, get_model(config).state_dict(), device, compile)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    for _ in range(3):  # warm up (and compile)
        train_step("ours", model, optimizer, x, y, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step("ours", model, optimizer, x, y, device)
    print(f"{steps} steps of {batch_size} × {seq_len} tokens in {time.perf_counter() - t0:.3f} s (profiled)")
    return prof


def profile_decode(config, device, steps):
    from deepseek_lm.generate.engine import Engine
    from deepseek_lm.generate.sampling import SamplingConfig

    torch.manual_seed(0)
    engine = Engine(load_ours(config, get_model(config).state_dict(), device).eval())
    prompt = [list(range(1, 33))]
    greedy = SamplingConfig(temperature=0.0)
    engine.generate_ids(prompt, 4, sampling=greedy)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate_ids(prompt, steps + 1, sampling=greedy)
    print(decode_parts(engine, prompt, greedy, max(steps, 64)))
    return prof


def decode_parts(engine, prompt, sampling, steps) -> str:
    """Wall time per token of the decoder's parts, timed by wrapping them (no profiler overhead)."""
    from deepseek_lm.model import decode

    spent: dict[str, float] = {}

    def timed(owner, attr: str, label: str):
        original = getattr(owner, attr)  # module functions and a plain method: no descriptors to keep

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
            return out

        setattr(owner, attr, wrapper)
        return original

    parts = [
        (decode, "_attention", "attention (all layers)"),
        (decode, "_ffn", "MLP / MoE (all layers)"),
        (decode, "_head", "LM head"),
        (decode.Decoder, "__call__", "decode step"),
    ]
    spent.update((label, 0.0) for _, _, label in parts)  # report in this order
    saved = [(owner, attr, timed(owner, attr, label)) for owner, attr, label in parts]
    try:
        t0 = time.perf_counter()
        engine.generate_ids(prompt, steps + 1, sampling=sampling)
        total = time.perf_counter() - t0
    finally:
        for owner, attr, inner in saved:
            setattr(owner, attr, inner)
    step = spent.pop("decode step")
    rest = step - sum(spent.values())
    lines = [f"per token over {steps} greedy tokens at batch 1 (prefill included in the total):"]
    lines += [f"{1e6 * v / steps:9.0f} µs  {k}" for k, v in spent.items()]
    lines.append(f"{1e6 * rest / steps:9.0f} µs  embedding, norms, residuals, positions")
    lines.append(
        f"{1e6 * (total - step) / steps:9.0f} µs  outside the decoder (prefill, sampling, bookkeeping)"
    )
    return "\n".join(lines)


def main(
    preset: str = "seed",
    what: str = "train",
    device: str = "auto",
    batch_size: int = 4,
    seq_len: int = 256,
    compile: bool = False,
    steps: int = 3,
    threads: int = 0,
    top: int = 25,
) -> None:
    """Print the top operations of `steps` training steps (what=train) or decode tokens (what=decode)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if threads:
        torch.set_num_threads(threads)
    config = DeepSeekConfig.from_preset(preset)
    if what == "train":
        prof = profile_training(config, dev, batch_size, seq_len, compile, steps)
    else:
        prof = profile_decode(config, dev, steps)
    print(top_ops(prof, dev, top))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
