"""Where self-speculative decoding's time goes, against plain decoding: a plain step and a speculative round
by part (wall time per call and dispatched operations per call, the latter independent of the load).

    python benchmarks/profile_speculative.py --checkpoint runs/mtp                 # batch 1, one draft
    python benchmarks/profile_speculative.py --checkpoint runs/mtp --draft_tokens 2 --batch 8 --compile

A round must cost less than (1 + accepted drafts) plain steps to pay: the table gives both sides. Prompts are
the bench's (validation windows of the checkpoint's training data).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepseek_lm.bench import BenchConfig
from deepseek_lm.bench.speculative import _prompts
from deepseek_lm.checkpoint import load_checkpoint
from deepseek_lm.generate import Engine, SamplingConfig
from deepseek_lm.generate import speculative as spec
from deepseek_lm.model import decode, draft


class CountOps(TorchDispatchMode):
    """Counts every operation dispatched to a kernel (views included), as the decode notes count them."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def timed_parts(parts: dict[str, tuple[object, str]]):
    """Wrap each (owner, attribute) to record wall time and calls; -> the record dict and an undo."""
    spent: dict[str, list[float]] = collections.defaultdict(list)
    originals = []
    for label, (owner, attr) in parts.items():
        original = getattr(owner, attr)
        originals.append((owner, attr, original))

        def wrapper(*args, _original=original, _label=label, **kwargs):
            t0 = time.perf_counter()
            out = _original(*args, **kwargs)
            spent[_label].append(time.perf_counter() - t0)
            return out

        setattr(owner, attr, wrapper)

    def undo():
        for owner, attr, original in originals:
            setattr(owner, attr, original)

    return spent, undo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--draft_tokens", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = BenchConfig(checkpoint=args.checkpoint, rounds=1, decode_batch=args.batch, speculative=True)
    rows = _prompts(ckpt, cfg)[: args.batch]
    greedy = SamplingConfig(temperature=0.0)
    plain = Engine(ckpt.model, compile=args.compile)
    fast = Engine(ckpt.model, compile=args.compile, speculative=True, draft_tokens=args.draft_tokens)
    for engine in (plain, fast):
        engine.eos_token_id = None
        engine.generate_ids(rows, args.new_tokens, sampling=greedy)  # warm up (and compile)

    def run(engine) -> float:
        t0 = time.perf_counter()
        engine.generate_ids(rows, args.new_tokens, sampling=greedy)
        return time.perf_counter() - t0

    totals = {"plain": [], "speculative": []}
    for _ in range(3):
        totals["plain"].append(run(plain))
        totals["speculative"].append(run(fast))
    stats = fast.speculative_stats
    spent, undo = timed_parts({
        "plain step (Decoder.__call__)": (decode.Decoder, "__call__"),
        "round (SpeculativeDecoder.greedy_round)": (draft.SpeculativeDecoder, "greedy_round"),
        "round: host bookkeeping (_emit, _record)": (spec.SpeculativeState, "_emit"),
    })  # fmt: skip
    run(plain), run(fast)
    undo()
    with CountOps() as ops_plain:
        run(plain)
    with CountOps() as ops_fast:
        run(fast)
    n, rounds = args.new_tokens - 1, fast.speculative_stats.rounds
    t_plain, t_fast = (statistics.median(totals[k]) for k in ("plain", "speculative"))
    print(f"{ckpt.path}: batch {args.batch}, {args.draft_tokens} draft(s), {'compiled' if args.compile else 'eager'}, "
          f"{args.threads} thread(s); {n} tokens after the first per row")  # fmt: skip
    print(
        f"acceptance {100 * stats.acceptance:.1f} %, histogram of drafts kept {stats.histogram}, "
        f"{rounds} rounds ({n / max(rounds, 1):.2f} tokens per round per row)"
    )
    print(
        f"whole call: plain {t_plain * 1e3:.1f} ms, speculative {t_fast * 1e3:.1f} ms ({t_plain / t_fast:.2f}×)"
    )
    print(
        f"dispatched operations per call: plain {ops_plain.count:,} ({ops_plain.count / n:.0f} per token), "
        f"speculative {ops_fast.count:,} ({ops_fast.count / max(rounds, 1):.0f} per round)"
    )
    for label, times in spent.items():
        print(f"  {label:<44} {statistics.median(times) * 1e3:7.3f} ms median over {len(times)} calls")


if __name__ == "__main__":
    main()
