"""Where speculative serving's time goes: a plain batching step against a speculative round, in one process.

    python benchmarks/profile_speculative_serving.py --checkpoint runs/mtp [--draft-tokens 1] [--threads 1]

For each number of rows n, n greedy requests (the serve load test's prompts, `--max-tokens` new tokens each)
run through a `BatchEngine` and a `SpeculativeBatchEngine` of n slots in turn (alternating, `--rounds`
times), and the loop's decode calls are timed: ms per plain step, ms per round, tokens per row and round,
hence the speculative/plain ratio of decode tokens/s at that batch size (prefill and the HTTP layer apart).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import PROMPTS

from deepseek_lm.checkpoint import load_checkpoint
from deepseek_lm.generate.batching import BatchEngine, Params
from deepseek_lm.generate.sampling import SamplingConfig
from deepseek_lm.generate.speculative_batching import SpeculativeBatchEngine


class _Timed:
    """The engine's decode call (a step or a round), timed: `times` gets each call's seconds."""

    def __init__(self, engine) -> None:
        self.times, self.busy, self.decode = [], False, engine._decode_step
        engine._decode_step = self

    def __call__(self) -> None:
        self.busy, t0 = True, time.perf_counter()
        self.decode()
        self.times.append(time.perf_counter() - t0)
        self.busy = False


def _run(engine, timer: _Timed, n: int, max_tokens: int) -> tuple[float, int, float]:
    """-> seconds in decode calls, the calls, and the drafts' acceptance, for n requests at once."""
    timer.times.clear()
    params = Params(max_tokens, SamplingConfig(temperature=0))
    requests = [engine.submit(engine.encode(p), params) for p in (PROMPTS * 2)[:n]]
    for r in requests:
        list(r.events(timeout=600))
    while timer.busy:  # the call that sent the last event has not returned yet
        time.sleep(0.001)
    drafted = sum(r.drafted for r in requests)
    return sum(timer.times), len(timer.times), sum(r.accepted for r in requests) / max(drafted, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--draft-tokens", type=int, default=1)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    print(f"{ckpt.path} · {args.draft_tokens} draft token(s) · {torch.get_num_threads()} thread(s) · "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for n in args.rows:
        engines = [
            kind(ckpt.model, ckpt.tokenizer, max_batch_size=n, **extra).start()
            for kind, extra in (
                (BatchEngine, {}),
                (SpeculativeBatchEngine, dict(draft_tokens=args.draft_tokens)),
            )
        ]
        for e in engines:
            e.eos_token_id = None  # every request runs its max_tokens
        timers = [_Timed(e) for e in engines]
        samples = {"plain": [], "speculative": []}
        for _ in range(args.rounds):
            for name, e, t in zip(samples, engines, timers):
                samples[name].append(_run(e, t, n, args.max_tokens))
        (t_plain, steps, _), (t_spec, rounds, acceptance) = (min(samples[k]) for k in samples)
        tokens = n * (args.max_tokens - 1)  # the first token of each request comes from its prefill
        print(
            f"{n:>3} rows: plain step {1e3 * t_plain / steps:6.2f} ms ({tokens / t_plain:7.0f} tokens/s) · "
            f"round {1e3 * t_spec / rounds:6.2f} ms = {t_spec / rounds / (t_plain / steps):.2f} steps for "
            f"{tokens / n / rounds:.2f} tokens per row ({tokens / t_spec:7.0f} tokens/s, "
            f"{t_plain / t_spec:.2f}×) · {100 * acceptance:.1f} % accepted · decode seconds, median: plain "
            f"{statistics.median(s[0] for s in samples['plain']):.3f}, "
            f"speculative {statistics.median(s[0] for s in samples['speculative']):.3f}"
        )
        for e in engines:
            e.close()
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
