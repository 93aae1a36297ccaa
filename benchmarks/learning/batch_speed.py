"""Training tokens per second of the demo's recipe at several micro-batch sizes, in one process, the sizes
taking turns (median over rounds; the study's `time_steps`), so that other work on the machine shifts them
all alike.

    python benchmarks/learning/batch_speed.py                    # 8, 16, 32 sequences of 128 tokens, 2 threads
    python benchmarks/learning/batch_speed.py --sizes 8 16 --threads 1

Per token, 8 × 128 and 16 × 128 reach the same validation bits per byte on the built-in corpus
(benchmarks/learning/README.md): the faster size is the better one for a time budget.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from study import Arm, configs, time_steps  # this directory's study.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32], help="micro-batch sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="steps per size per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms = [Arm(f"{n}", f"micro-batch {n}", train=dict(micro_batch_size=n)) for n in args.sizes]
    with tempfile.TemporaryDirectory() as tmp:
        seconds = time_steps(arms, args.rounds, args.steps, Path(tmp))
    for arm in arms:
        _, cfg = configs(arm)
        tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * cfg.seq_len
        print(f"{arm.label:16s}: {tokens_per_step / seconds[arm.name]:8,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
