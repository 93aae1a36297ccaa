"""Training tokens per second of the demo's recipe at several micro-batch sizes, in one process, the sizes
taking turns (median over rounds), so that other work on the machine shifts them all alike.

    python benchmarks/learning/batch_speed.py                    # 8, 16, 32 sequences of 128 tokens, 2 threads
    python benchmarks/learning/batch_speed.py --sizes 8 16 --threads 1

Per token, 8 × 128 and 16 × 128 reach the same validation bits per byte on the built-in corpus
(benchmarks/learning/README.md): the faster size is the better one for a time budget.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.train.config import TrainConfig, preset_defaults


def trainer(micro_batch: int, run_dir: Path):
    from deepseek_lm.train.trainer import build_trainer

    model, train = preset_defaults("demo")
    train.update(max_time_minutes=None, schedule_by_time=False, sample_every=0, micro_batch_size=micro_batch)
    return build_trainer(DeepSeekConfig.from_dict(model), TrainConfig.from_dict(train), run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32], help="micro-batch sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per size per round")
    args = parser.parse_args(argv)
    from deepseek_lm.train.loop import train_step

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {n: trainer(n, Path(tmp) / str(n)) for n in args.sizes}
        for t in trainers.values():  # warm-up: allocator, oneDNN primitives
            for _ in range(3):
                train_step(t, False)
        seconds_per_token: dict[int, list[float]] = {n: [] for n in trainers}
        for _ in range(args.rounds):
            for n, t in trainers.items():
                steps = max(1, args.tokens // t.tokens_per_step)
                start = time.perf_counter()
                for _ in range(steps):
                    train_step(t, False)
                seconds_per_token[n].append((time.perf_counter() - start) / (steps * t.tokens_per_step))
    for n, s in seconds_per_token.items():
        print(f"micro-batch {n:3d}: {1 / statistics.median(s):8,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
