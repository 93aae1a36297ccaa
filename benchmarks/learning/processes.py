"""Training tokens per second of the demo's recipe in one process against several local processes
(`--train.cpu_processes`), the same global batch (16 × 128 tokens per step), the two taking turns.

    python benchmarks/learning/processes.py                    # 1 × 2 threads against 2 × 1 thread, 4 rounds
    python benchmarks/learning/processes.py --rounds 6 --steps 80

Each turn is a real `deepseek-lm train --preset demo` command, step-scheduled for `--steps` steps with no
evaluation, samples or checkpoints; its tokens per second are read back from its metrics.jsonl after the
first log window (start-up and warm-up left out). Processes cannot take turns inside one process as the
study's arms do, so the rounds alternate whole commands: run it on a quiet machine, the medians and the load
average are printed and written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date

from study import ROOT, machine  # this directory's study.py

from deepseek_lm.train.config import preset_defaults
from deepseek_lm.train.monitor import read_metrics

RESULTS = ROOT / "benchmarks" / "results"


def layouts(processes: int) -> dict[str, list[str]]:
    """{name: extra flags}: one process with every core, and `processes` processes sharing the batch."""
    _, demo = preset_defaults("demo")
    per_process = demo["micro_batch_size"] * demo["cpu_processes"] // processes
    return {
        "1 process": ["--train.cpu_processes", "1", "--train.micro_batch_size", str(per_process * processes)],
        f"{processes} processes": [
            "--train.cpu_processes", str(processes), "--train.micro_batch_size", str(per_process),
        ],
    }  # fmt: skip


def tokens_per_s(flags: list[str], steps: int, log_every: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            sys.executable, "-m", "deepseek_lm", "train", "--preset", "demo", "--out", tmp, "--max-steps",
            str(steps), "--train.schedule_by_time", "false", "--train.max_time_minutes", "null",
            "--train.eval_every", "0", "--train.sample_every", "0", "--train.save_every", "0",
            "--train.log_every", str(log_every), "--train.peak_flops", "1e12", *flags,
        ]  # fmt: skip
        subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        windows = read_metrics(tmp, "train")[1:]  # the first window holds the warm-up
        return sum(w["tokens_per_s"] * w["step_time_s"] for w in windows) / sum(
            w["step_time_s"] for w in windows
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="steps per command (the first 10 not timed)")
    args = parser.parse_args(argv)
    info = machine() | {"load_before": os.getloadavg()}
    runs: dict[str, list[float]] = {name: [] for name in layouts(args.processes)}
    for r in range(args.rounds):
        names = list(runs)[r % 2 :] + list(runs)[: r % 2]
        for name in names:
            runs[name].append(tokens_per_s(layouts(args.processes)[name], args.steps, 10))
            print(
                f"round {r + 1}: {name:12s} {runs[name][-1]:8,.0f} tokens/s  (load {os.getloadavg()[0]:.2f})"
            )
    medians = {name: statistics.median(v) for name, v in runs.items()}
    base = medians["1 process"]
    print("\n| layout | tokens/s (median) | ratio |\n|---|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value:,.0f} | {value / base:.2f} |")
    out = RESULTS / f"{date.today().isoformat()}-learning-processes-{info['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = info | {"runs": runs, "medians": medians, "load_after": os.getloadavg(), "steps": args.steps}
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"load {info['load_before'][0]:.2f} -> {os.getloadavg()[0]:.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
