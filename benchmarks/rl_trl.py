"""`deepseek-lm rl` against TRL's GRPOTrainer: the same checkpoint (TRL trains our Hugging Face export), task,
group size, batch, learning rate, KL weight and wall-clock budget, one after the other on the same threads.

    python benchmarks/rl_trl.py --checkpoint runs/rl-recipe/arith-sft --minutes 5 \
        --trl-python /work/venvs/trl/bin/python --json benchmarks/results/rl-trl.json

TRL runs in its own environment (`--trl-python`: a venv with torch 2.13.0 installed first, then trl==1.16.0;
never the project's). The task is the built-in arithmetic task (its held-out problems are never trained on),
so start from a checkpoint fine-tuned on its answer format (`finetune --task arithmetic`): from a model
that never answers right, every group is flat and neither trainer learns anything.

Reported: completions per second of training (completions sampled / seconds in the training loop, startup
and final evaluation excluded; neither runs evaluations inside the loop), steps, and the held-out reward
(greedy, every held-out problem) of the starting checkpoint, of ours and of TRL's result (imported back with
`deepseek-lm import`: the same scorer for all three). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        sys.exit(f"failed ({code}); see {log}")


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return out.stdout.strip() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="a chat checkpoint fine-tuned on the arithmetic format"
    )
    p.add_argument("--trl-python", default="/work/venvs/trl/bin/python")
    p.add_argument("--minutes", type=float, default=5.0, help="each trainer's wall-clock budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/rl-trl", help="scratch directory (replaced)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import shutil

    from deepseek_lm.checkpoint import latest_checkpoint, read_config_json, read_trainer_state
    from deepseek_lm.data.tasks import task_rows
    from deepseek_lm.interop.hf import export_hf, import_hf
    from deepseek_lm.rl.evaluate import score_checkpoint

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    load_before = os.getloadavg()
    print(f"load average before: {load_before}", flush=True)

    export_hf(args.checkpoint, work / "hf")
    rows = [
        {"prompt": r["messages"], "answer": r["fields"]["answer"]} for r in task_rows("arithmetic", "train")
    ]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run([args.trl_python, str(HERE / "rl_trl_side.py"), "--hf", str(work / "hf"), "--prompts",
         str(work / "train.jsonl"), "--minutes", str(args.minutes), "--out", str(work / "trl")],
        work / "trl.log", env)  # fmt: skip
    trl = json.loads((work / "trl" / "run.json").read_text())
    run([sys.executable, "-m", "deepseek_lm", "rl", "--checkpoint", args.checkpoint, "--task", "arithmetic",
         "--out", str(work / "ours"), "--train.max_time_minutes", str(args.minutes), "--train.eval_every", "0",
         "--train.save_every", "0"], work / "ours.log", env)  # fmt: skip
    last = latest_checkpoint(work / "ours")
    ours_state, saved = read_trainer_state(last)["state"], read_config_json(last)[1]
    steps = ours_state["step"]
    ours_completions = steps * saved["prompts_per_step"] * saved["group_size"]
    import_hf(work / "trl" / "final", work / "trl-imported")
    scores = {
        name: score_checkpoint(path, ["arithmetic"])["reward"]
        for name, path in (
            ("start", args.checkpoint),
            ("ours", work / "ours"),
            ("trl", work / "trl-imported"),
        )
    }
    result = {
        "machine": platform.processor() or platform.machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
        "minutes": args.minutes, "threads": args.threads, "load_before": load_before, "load_after": os.getloadavg(),
        "ours": {"steps": steps, "completions": ours_completions, "train_s": ours_state["train_seconds"],
                 "completions_per_s": ours_completions / ours_state["train_seconds"], "held_out_reward": scores["ours"]},
        "trl": {"steps": trl["steps"], "completions": trl["completions"], "train_s": trl["train_s"],
                "completions_per_s": trl["completions"] / trl["train_s"], "held_out_reward": scores["trl"]},
        "start_held_out_reward": scores["start"],
    }  # fmt: skip
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def print_table(r: dict) -> None:
    print(f"\nGRPO on arithmetic, {r['minutes']:g} min each, {r['threads']} threads, load {r['load_before'][0]:.1f} -> "
          f"{r['load_after'][0]:.1f}, commit {r['commit']}")  # fmt: skip
    print(f"{'':<22}{'steps':>8}{'completions/s':>16}{'held-out reward':>18}")
    print(f"{'start (no RL)':<22}{'':>8}{'':>16}{r['start_held_out_reward']:>18.3f}")
    for name, label in (("ours", "deepseek-lm rl"), ("trl", "TRL GRPOTrainer")):
        s = r[name]
        print(f"{label:<22}{s['steps']:>8}{s['completions_per_s']:>16.1f}{s['held_out_reward']:>18.3f}")
    print(f"completions/s: {r['ours']['completions_per_s'] / r['trl']['completions_per_s']:.2f}x TRL's")


if __name__ == "__main__":
    main()
