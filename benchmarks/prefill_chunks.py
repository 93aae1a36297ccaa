"""What the chat chunking rule costs and saves in prefill compute, turn by turn (a benchmark, never a test).

    python benchmarks/prefill_chunks.py --checkpoint runs/chat --json benchmarks/results/X.json

The conversations of `serve_load.py --workload chat` (its system message and questions), answered greedily
by the checkpoint (64 tokens at most, as the load test does), then each turn's prompt prefilled as the
serving engine does it, in the engine's own chunks (generate/chunking.py, `--prefill-chunk` 256):
- fixed: chunks at fixed offsets (what the engine did before the chat rule; a prompt that has no user-turn
  token still is cut so);
- cold: the chat rule, nothing cached: the prompt a cache has never seen (the server without the cache);
- warm: the chat rule, its history cached as the server's prefix cache holds it after the previous turn:
  only the new user turn is computed;
- ahead: what the server prefilled after the previous turn ended (its question and answer), off that turn's
  critical path.
Each figure is the CPU time of the thread that runs the prefill (one intra-op thread), median over
`--rounds` repetitions: a busy machine moves it far less than wall time. The wall time of the same
prefills is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import CHAT_TURNS, SYSTEM, _commit

from deepseek_lm.checkpoint import load_checkpoint
from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.generate.batching import BatchEngine, Params
from deepseek_lm.generate.chunking import chunk_ends
from deepseek_lm.model.prefill import Prefill, fill


def _conversations(engine: BatchEngine, fmt: ChatFormat, max_tokens: int) -> list[list[list[int]]]:
    """Each conversation's prompts, turn by turn, with the checkpoint's own greedy answers in between."""
    talks = []
    for questions in CHAT_TURNS:
        messages, prompts = [{"role": "system", "content": SYSTEM}], []
        for question in questions:
            messages.append({"role": "user", "content": question})
            prompts.append(engine.encode(fmt.render(messages)))
            params = Params(max_tokens=max_tokens, stop_token_ids=fmt.stop_token_ids)
            events = list(engine.submit(prompts[-1], params).events(timeout=120))
            messages.append({"role": "assistant", "content": "".join(e.text for e in events)})
        talks.append(prompts)
    return talks


def _timed(
    model, fast, cache, ids: list[int], ends: list[int], start: int, rounds: int
) -> tuple[float, float]:
    """Prefill ids' chunks after `start` (the positions before it already in the cache) -> the median
    (thread CPU, wall) seconds."""
    cpu, wall = [], []
    with torch.inference_mode():
        for _ in range(rounds):
            c, w, a = time.thread_time(), time.perf_counter(), start
            for end in (e for e in ends if e > start):
                fill(model, fast, torch.tensor([ids[a:end]]), cache, a)
                a = end
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64, help="answer length, as serve_load's")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    fmt = ChatFormat.for_tokenizer(ckpt.tokenizer, ckpt.chat_template)
    starts = fmt.user_turn_ids(ckpt.tokenizer)
    if not starts:
        raise SystemExit(
            f"{args.checkpoint}: its chat template has no user-turn token; the rule cuts nothing"
        )
    info = dict(commit=_commit(), date=time.strftime("%Y-%m-%d %H:%M"), load_before=os.getloadavg(),
                checkpoint=args.checkpoint, prefill_chunk=args.prefill_chunk, rounds=args.rounds, threads=1)  # fmt: skip
    engine = BatchEngine(ckpt.model, ckpt.tokenizer, max_batch_size=1, chunk_starts=starts).start()
    try:
        talks = _conversations(engine, fmt, args.max_tokens)
    finally:
        engine.close()
    model, fast = ckpt.model.eval(), Prefill(ckpt.model) if Prefill.supports(ckpt.model) else None
    cache = model.new_cache(1, model.config.max_position_embeddings)
    rows = []
    for t, prompts in enumerate(talks):
        for k, ids in enumerate(prompts):
            fixed, rule = chunk_ends(ids, args.prefill_chunk), chunk_ends(ids, args.prefill_chunk, starts)
            history = max(i for i, token in enumerate(ids) if token in starts)  # the last user turn's start
            row = dict(conversation=t, turn=k + 1, tokens=len(ids), fixed_chunks=len(fixed), cold_chunks=len(rule),
                       new_tokens=len(ids) - history)  # fmt: skip
            for name, ends, start in (("fixed", fixed, 0), ("cold", rule, 0), ("warm", rule, history)):
                _timed(model, fast, cache, ids, rule, 0, 1)  # the cache as the server's would hold it
                row[name], row[f"{name}_wall"] = _timed(model, fast, cache, ids, ends, start, args.rounds)
            if k + 1 < len(prompts):  # the turn's answer, prefilled ahead of the next turn
                nxt = prompts[k + 1]
                done = max(i for i, token in enumerate(nxt) if token in starts)  # the next prompt's history
                ahead = chunk_ends(nxt[:done], args.prefill_chunk, starts)
                _timed(model, fast, cache, nxt, ahead, 0, 1)
                row["ahead"], row["ahead_wall"] = _timed(model, fast, cache, nxt, ahead, history, args.rounds)
            rows.append(row)
    info["load_after"] = os.getloadavg()
    _print(rows, info)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(info=info, rows=rows), indent=2) + "\n")
    return 0


def _median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def _print(rows: list[dict], info: dict) -> None:
    print(" · ".join(f"{k} {v}" for k, v in info.items() if k != "load_after"))
    print("\nprefill CPU ms per turn (one thread), median over the conversations; (chunks)")
    print(f"{'turn':>4}{'tokens':>8}{'new':>6}{'fixed':>14}{'cold (rule)':>16}{'warm':>8}{'ahead':>8}"
          f"{'cold/fixed':>12}{'warm/fixed':>12}")  # fmt: skip
    for turn in sorted({r["turn"] for r in rows}):
        rs = [r for r in rows if r["turn"] == turn]
        fixed, cold, warm, ahead = (_median(rs, k) for k in ("fixed", "cold", "warm", "ahead"))
        print(f"{turn:>4}{_median(rs, 'tokens'):>8.0f}{_median(rs, 'new_tokens'):>6.0f}"
              f"{1e3 * fixed:>9.2f} ({_median(rs, 'fixed_chunks'):.0f}){1e3 * cold:>11.2f} "
              f"({_median(rs, 'cold_chunks'):.0f}){1e3 * warm:>8.2f}{1e3 * ahead:>8.2f}"
              f"{cold / fixed:>12.2f}{warm / fixed:>12.2f}")  # fmt: skip
    print(f"load average before {info['load_before'][0]:.2f}, after {info['load_after'][0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
