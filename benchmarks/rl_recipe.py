"""The RL recipe on the demo chat model, measured: held-out reward and exact match per built-in task before
and after `deepseek-lm rl`'s default budget, and the arithmetic task after SFT alone vs SFT + GRPO.

    python benchmarks/rl_recipe.py --checkpoint runs/chat --json benchmarks/results/rl-recipe.json

Runs the README's commands, each as a subprocess (logs in --work):
1. `deepseek-lm rl --checkpoint CHAT --out WORK/builtin`                       all built-in tasks, default budget
2. `deepseek-lm finetune --checkpoint CHAT --task arithmetic --train.epochs 40 --out WORK/arith-sft`
                                                                                the answer format (3-minute budget)
3. `deepseek-lm rl --checkpoint WORK/arith-sft --task arithmetic --out WORK/arith-rl`   default budget
4. with --control: the same SFT for 3 + RL's minutes (`--train.max_time_minutes`), so SFT alone gets the
   compute SFT + GRPO got.
Before/after figures are the runs' own first and final evaluations (greedy, every held-out prompt; the
first evaluation of step 3 is the SFT model's). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEEPSEEK_LM = [sys.executable, "-m", "deepseek_lm"]


def run(args: list[str], log: Path) -> float:
    print("$ deepseek-lm", " ".join(args), f"> {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([*DEEPSEEK_LM, *args], stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"failed ({code}); see {log}")
    return time.perf_counter() - start


def first_and_last_eval(run_dir: Path) -> tuple[dict, dict]:
    from deepseek_lm.train.monitor import read_metrics

    evals = read_metrics(run_dir, "eval")
    return evals[0], evals[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/chat", help="the chat model (make chat's runs/chat)")
    p.add_argument("--work", default="runs/rl-recipe", help="where the runs go (replaced)")
    p.add_argument("--control", action="store_true", help="also SFT alone for SFT + GRPO's total minutes")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from deepseek_lm.rl.config import RL_DEFAULTS
    from deepseek_lm.rl.evaluate import score_checkpoint
    from deepseek_lm.train.finetune import FINETUNE_DEFAULTS

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_before = os.getloadavg()
    print(f"load average before: {load_before}", flush=True)
    seconds = {
        "builtin": run(
            ["rl", "--checkpoint", args.checkpoint, "--out", str(work / "builtin")], work / "builtin.log"
        )
    }
    sft = ["finetune", "--checkpoint", args.checkpoint, "--task", "arithmetic", "--train.epochs", "40"]
    seconds["arith-sft"] = run([*sft, "--out", str(work / "arith-sft")], work / "arith-sft.log")
    seconds["arith-rl"] = run(
        [
            "rl",
            "--checkpoint",
            str(work / "arith-sft"),
            "--task",
            "arithmetic",
            "--out",
            str(work / "arith-rl"),
        ],
        work / "arith-rl.log",
    )
    before, after = first_and_last_eval(work / "builtin")
    sft_alone, sft_rl = first_and_last_eval(work / "arith-rl")
    result = {
        "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=HERE).stdout.strip(),
        "load_before": load_before, "seconds": seconds, "builtin": {"before": before, "after": after},
        "arithmetic": {"sft": sft_alone, "sft+grpo": sft_rl},
    }  # fmt: skip
    if args.control:
        minutes = FINETUNE_DEFAULTS["max_time_minutes"] + RL_DEFAULTS["max_time_minutes"]
        control = work / "arith-sft-long"
        seconds["arith-sft-long"] = run(
            [*sft, "--train.max_time_minutes", str(minutes), "--out", str(control)],
            work / "arith-sft-long.log",
        )
        result["arithmetic"]["sft-long"] = score_checkpoint(control, ["arithmetic"])
    result["load_after"] = os.getloadavg()
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def print_table(r: dict) -> None:
    print(f"\nload {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}, commit {r['commit']}")
    print(f"{'held-out (greedy)':<26}{'reward before':>15}{'after':>8}{'exact before':>15}{'after':>8}")
    b, a = r["builtin"]["before"], r["builtin"]["after"]
    for task in [k[len("reward_") :] for k in b if k.startswith("reward_")] + [""]:
        key = f"_{task}" if task else ""
        name = task or "mean over tasks"
        print(f"{name:<26}{b['reward' + key]:>15.3f}{a['reward' + key]:>8.3f}"
              f"{b.get('exact' + key, 0):>15.1%}{a.get('exact' + key, 0):>8.1%}")  # fmt: skip
    print("\narithmetic, held-out accuracy (exact)")
    for name, m in r["arithmetic"].items():
        print(f"  {name:<12}{m['exact_arithmetic']:.1%}  ({m['prompts_arithmetic']} problems)")


if __name__ == "__main__":
    main()
