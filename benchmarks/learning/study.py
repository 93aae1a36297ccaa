"""What the DeepSeek architecture buys at the demo's scale: validation bits per byte against wall-clock and
against tokens, on this machine, for

    (a) AdamW vs Muon                  (train.optimizer)
    (b) MTP off vs on                  (model.num_nextn_predict_layers 1, train.mtp_weight)
    (c) the seed MoE vs a dense SwiGLU of the same frame with the same activated parameters per token
        (first_k_dense_replace = num_hidden_layers, intermediate_size = (shared + top-k) × expert size)
    (d) MLA vs plain multi-head attention of the same width (`MHA` below, swapped in through
        `build_trainer(customize=...)`: the library keeps one attention type)
    (e) the embeddings' own learning rate (train.embedding_lr) vs train.lr for them too
    (f) 256-token windows, 8 per step, vs the demo's 16 of 128 (the same tokens per step)

each against the demo's recipe (`--preset demo`: the seed architecture on the built-in corpus), at the same
wall-clock budget and at the same number of tokens.

    python benchmarks/learning/study.py --minutes 7            # about an hour on 2 cores
    python benchmarks/learning/study.py --minutes 3 --steps 480 --jobs 2   # the demo gets 480 steps in 3 min
    python benchmarks/learning/study.py --minutes 2 --jobs 2   # a quick look; two runs at a time
    python benchmarks/learning/study.py --arms demo dense      # some of the arms

How, so that other work on the machine changes only the timing phase, never the curves:
1. every arm's optimizer step is timed, the arms alternating in one process at the threads each of
   `make train`'s processes gets (one on 2 cores: train.cpu_processes 2; `--threads` to change it),
   median over rounds → the steps each arm gets in M minutes of training steps (evaluation not counted);
   on a busy machine `--steps N` gives the demo's steps in M minutes as measured on a quiet one (`make
   train`'s log), and the other arms keep the timed ratios;
2. every arm trains for its own steps (equal time) and for the demo's steps (equal tokens), each with the
   learning-rate schedule over its own steps (`--train.max_steps N --train.schedule_by_time false`), so a run
   is the same whatever the load (and `--jobs 2` runs two at a time, one thread each);
3. `docs/images/learning-study.png` (curves: validation bits per byte against the step's wall-clock at the
   measured step time, and against tokens) and a JSON file plus a markdown table in
   `benchmarks/learning/results/` (commit, machine, date, load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.data import baselines
from deepseek_lm.model.layers import apply_rope, yarn_softmax_scale
from deepseek_lm.model.mla import MLA, Positions
from deepseek_lm.train.config import TrainConfig, preset_defaults
from deepseek_lm.train.launch import threads_per_process

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
IMAGE = ROOT / "docs" / "images" / "learning-study.png"
CURVE_POINTS = 10  # periodic evaluations per run (on the preset's eval_batches), then one on the whole split


# ---------------------------------------------------------------------------------------------------------
# plain multi-head attention with MLA's call signature


class MHA(nn.Module):
    """Multi-head attention of MLA's width: full-rank q, k, v (D → H·(dn + dr), H·(dn + dr), H·dv) and o.

    The same score as MLA (per head [nope | rope] halves, RoPE on the last dr dimensions of q and k, the
    same softmax scale), but every head has its own full-rank key instead of MLA's low-rank latent and shared
    rope key. Training only: it has no latent cache to decode with.
    """

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.n_heads, self.dr, self.dv = (
            config.num_attention_heads,
            config.qk_rope_head_dim,
            config.v_head_dim,
        )
        D, H, dqk = config.hidden_size, self.n_heads, config.qk_head_dim
        self.scale = yarn_softmax_scale(config)
        self.q_proj = nn.Linear(D, H * dqk, bias=False)
        self.k_proj = nn.Linear(D, H * dqk, bias=False)
        self.v_proj = nn.Linear(D, H * self.dv, bias=False)
        self.o_proj = nn.Linear(H * self.dv, D, bias=False)

    def forward(self, x: torch.Tensor, pos: Positions, cache: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None:
            raise NotImplementedError("the study's MHA trains only; it has no KV cache")
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, -1)  # (B, T, H, dn + dr)
        k = self.k_proj(x).view(B, T, self.n_heads, -1)
        v = self.v_proj(x).view(B, T, self.n_heads, self.dv)
        q = torch.cat((q[..., : -self.dr], apply_rope(q[..., -self.dr :], pos.cos, pos.sin)), dim=-1)
        k = torch.cat((k[..., : -self.dr], apply_rope(k[..., -self.dr :], pos.cos, pos.sin)), dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
        )  # (B, H, T, dv)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def use_mha(model: nn.Module) -> None:
    """`customize` hook: every block's MLA replaced by MHA, then the model's one initialisation table."""
    for block in model.layers:
        assert isinstance(block.self_attn, MLA)
        block.self_attn = MHA(model.config).to(next(model.parameters()).device)
    model.init_weights()


# ---------------------------------------------------------------------------------------------------------
# the arms


@dataclass
class Arm:
    name: str
    label: str
    model: dict = field(default_factory=dict)  # DeepSeekConfig overrides of the demo preset
    train: dict = field(default_factory=dict)  # TrainConfig overrides of the demo preset
    mha: bool = False


def arms() -> dict[str, Arm]:
    """The demo recipe and one change each. The other optimizer keeps the demo's other settings, with its
    own learning rate (Muon's lr is tuned in the demo preset's comment in train/config.py)."""
    seed = DeepSeekConfig()
    _, demo = preset_defaults("demo")
    other_optimizer = "adamw" if demo["optimizer"] == "muon" else "muon"
    dense_size = (seed.n_shared_experts + seed.num_experts_per_tok) * seed.moe_intermediate_size
    global_batch = demo["micro_batch_size"] * demo["cpu_processes"]
    all_arms = [
        Arm("demo", f"demo ({demo['optimizer']}, MoE, MLA)"),
        Arm(other_optimizer, other_optimizer, train=OTHER_OPTIMIZER[other_optimizer]),
        Arm("mtp", "MTP on (1 module)", model=dict(num_nextn_predict_layers=1), train=dict(mtp_weight=0.3)),
        Arm(
            "dense",
            f"dense SwiGLU {dense_size}",
            model=dict(first_k_dense_replace=seed.num_hidden_layers, intermediate_size=dense_size),
        ),
        Arm("mha", "plain MHA", mha=True),
        Arm("embedding", "embeddings at train.lr", train=dict(embedding_lr=None)),
        Arm("seq256", "8 × 256 tokens per step", train=dict(seq_len=256, micro_batch_size=global_batch // 2)),
    ]
    return {a.name: a for a in all_arms}


# the settings of the optimizer the demo does not use, from the runs that chose the demo's
OTHER_OPTIMIZER = {
    "adamw": dict(optimizer="adamw", lr=6e-3),
    "muon": dict(optimizer="muon"),
}


def configs(arm: Arm, **train_overrides) -> tuple[DeepSeekConfig, TrainConfig]:
    model, train = preset_defaults("demo")
    # one process holds the demo's global batch (`make train` shares it out over train.cpu_processes: the
    # same arithmetic, gradients averaged over the processes)
    train.update(micro_batch_size=train["micro_batch_size"] * train["cpu_processes"], cpu_processes=1)
    train.update(max_time_minutes=None, schedule_by_time=False, sample_every=0, peak_flops=1e12)
    train.update(arm.train, **train_overrides)
    return DeepSeekConfig.from_dict({**model, **arm.model}), TrainConfig.from_dict(train)


def build(arm: Arm, run_dir: Path, **train_overrides):
    from deepseek_lm.train.trainer import build_trainer

    model_config, cfg = configs(arm, **train_overrides)
    return build_trainer(model_config, cfg, run_dir, customize=use_mha if arm.mha else None)


# ---------------------------------------------------------------------------------------------------------
# 1. step times, alternating


def time_steps(chosen: list[Arm], rounds: int, steps: int, workdir: Path) -> dict[str, float]:
    """Median seconds per optimizer step of each arm; the arms take turns, `steps` steps per turn."""
    from deepseek_lm.train.loop import train_step

    trainers = {a.name: build(a, workdir / f"time-{a.name}") for a in chosen}
    for t in trainers.values():  # warm-up: allocator, oneDNN primitives
        for _ in range(3):
            train_step(t, False)
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(rounds):
        names = list(trainers)[r % len(trainers) :] + list(trainers)[: r % len(trainers)]
        for name in names:
            start = time.perf_counter()
            for _ in range(steps):
                train_step(trainers[name], False)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


# ---------------------------------------------------------------------------------------------------------
# 2. the runs


def run_arm(arm: Arm, steps: int, threads: int | None) -> dict:
    """Train `arm` for `steps` optimizer steps; the validation curve (periodic and final evaluations) and the
    training batches' curve (their mean loss over each stretch between evaluations, in bits per byte of the
    training text): the generalisation gap is the last of the one against the last of the other."""
    from deepseek_lm.train.loop import evaluate, train_step
    from deepseek_lm.train.monitor import bits_per_byte

    if threads:
        torch.set_num_threads(threads)
    every = max(steps // CURVE_POINTS, 1)
    with tempfile.TemporaryDirectory() as tmp:
        t = build(arm, Path(tmp), max_steps=steps)
        curve, train_curve, losses, start = [], [], [], time.perf_counter()
        for step in range(1, steps + 1):
            result = train_step(t, False)
            if result.skipped:
                raise RuntimeError(f"{arm.name}: non-finite loss at step {step}")
            losses.append(result.loss)
            if step % every == 0 or step == steps:
                mean = sum(losses) / len(losses)
                train_curve.append(
                    {"step": step, "bits_per_byte": bits_per_byte(mean, t.data.bytes_per_token("train"))}
                )
                losses = []
            if step % every == 0 and step < steps:
                curve.append(
                    {"step": step, "bits_per_byte": evaluate(t, t.cfg.eval_batches)["bits_per_byte"]}
                )
        final = evaluate(t, None)  # the whole validation split, as the demo's final evaluation
        curve.append({"step": steps, "bits_per_byte": final["bits_per_byte"], "full": True})
        counts = t.raw_model.param_counts()
        return {
            "arm": arm.name, "steps": steps, "tokens_per_step": t.tokens_per_step, "curve": curve,
            "train_curve": train_curve, "final_bits_per_byte": final["bits_per_byte"],
            "train_seconds": time.perf_counter() - start,
            "params": counts["total"], "activated": counts["activated"],
            "xz_bits_per_byte": t.data.manifest.get("xz_bits_per_byte"),
            "baselines": baselines.named(t.data.manifest),
        }  # fmt: skip


def run_all(jobs: list[tuple[Arm, int]], parallel: int, done: list[dict] = ()) -> list[dict]:
    """The runs of `jobs`, taking from `done` those already made (same arm and steps: a run does not depend on
    the machine's load, so an interrupted or re-timed study need not redo them)."""
    known = {(r["arm"], r["steps"]): r for r in done}
    todo = list(
        {(arm.name, steps): (arm, steps) for arm, steps in jobs if (arm.name, steps) not in known}.values()
    )
    if parallel <= 1:
        new = [run_arm(arm, steps, None) for arm, steps in todo]
    else:
        with ProcessPoolExecutor(parallel, mp_context=get_context("spawn")) as pool:
            new = list(pool.map(run_arm, *zip(*todo), [1] * len(todo))) if todo else []
    known |= {(r["arm"], r["steps"]): r for r in new}
    return [known[arm.name, steps] for arm, steps in jobs]


# ---------------------------------------------------------------------------------------------------------
# 3. figure and table


PAIRS = [("a", "optimizer", ("adamw", "muon")), ("b", "MTP", ("mtp",)), ("c", "MoE vs dense", ("dense",)),
         ("d", "MLA vs MHA", ("mha",)), ("e", "embedding learning rate", ("embedding",)),
         ("f", "sequence length", ("seq256",))]  # fmt: skip


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(tag, title, [n for n in names if n in results["step_seconds"] and n != "demo"])
            for tag, title, names in PAIRS]  # fmt: skip
    rows = [r for r in rows if r[2]]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.2 * len(rows)), squeeze=False)
    bars = results.get("baselines") or {"xz -9": results["xz_bits_per_byte"]}
    # the first evaluations (bits/byte 3+) would squash the part that decides: cut at the demo's third point
    top = results["equal_time"]["demo"]["curve"][min(2, len(results["equal_time"]["demo"]["curve"]) - 1)]
    top = top["bits_per_byte"] + 0.05
    for (tag, title, names), (ax_time, ax_tokens) in zip(rows, axes):
        for name in ["demo", *names]:
            label = results["labels"][name]
            run_time, run_tokens = results["equal_time"][name], results["equal_tokens"][name]
            seconds = results["step_seconds"][name]
            ax_time.plot([p["step"] * seconds / 60 for p in run_time["curve"]],
                         [p["bits_per_byte"] for p in run_time["curve"]], "o-", ms=3, label=label)  # fmt: skip
            tokens = run_tokens["tokens_per_step"]
            ax_tokens.plot([p["step"] * tokens / 1e6 for p in run_tokens["curve"]],
                           [p["bits_per_byte"] for p in run_tokens["curve"]], "o-", ms=3, label=label)  # fmt: skip
        for ax, xlabel in ((ax_time, "minutes of training steps"), (ax_tokens, "million tokens")):
            for (bar, value), style in zip(bars.items(), ("--", ":")):
                ax.axhline(value, color="gray", ls=style, lw=1, label=f"{bar} ({value:.3f})")
            ax.set(xlabel=xlabel, ylabel="validation bits/byte", title=f"({tag}) {title}")
            ax.set_ylim(top=top)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    """One row per arm; `gap`: the equal-token run's last training batches against its final validation
    (both in bits per byte; runs made before the training curve was kept show none)."""
    lines = [
        "| arm | params (activated) | s / step | steps in budget | bits/byte, equal time | bits/byte, equal tokens "
        "| train batches (gap) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, seconds in results["step_seconds"].items():
        t, k = results["equal_time"][name], results["equal_tokens"][name]
        train = k.get("train_curve")
        gap = (
            f"{train[-1]['bits_per_byte']:.3f} ({k['final_bits_per_byte'] - train[-1]['bits_per_byte']:.3f})"
        )
        lines.append(
            f"| {results['labels'][name]} | {t['params'] / 1e6:.2f} M ({t['activated'] / 1e6:.2f} M) | "
            f"{seconds:.3f} | {t['steps']:,} | {t['final_bits_per_byte']:.3f} | {k['final_bits_per_byte']:.3f} | "
            f"{gap if train else ''} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# main


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""  # fmt: skip
    return {
        "commit": commit.stdout.strip() or "unknown", "date": date.today().isoformat(), "cpu": cpu,
        "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=7.0, help="training-step budget of each arm")
    parser.add_argument(
        "--steps", type=int, default=None,
        help="the demo arm's steps (default: --minutes over its timed step); the other arms' equal-time steps "
        "scale by the timed ratios, so a busy machine changes nothing but the run time",
    )  # fmt: skip
    parser.add_argument("--arms", nargs="+", default=list(arms()), choices=list(arms()))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each when > 1)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (alternating arms)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="threads of the timing phase (default: those of each of the demo's processes)",
    )  # fmt: skip
    parser.add_argument("--timing-steps", type=int, default=10, help="steps per arm per timing round")
    parser.add_argument("--time-only", action="store_true", help="print the arms' step times and stop")
    parser.add_argument(
        "--reuse", type=Path, nargs="*", default=[],
        help="results JSON files of earlier studies (same commit): their runs of the same arm and steps are reused",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default results/DATE-COMMIT.json)"
    )
    args = parser.parse_args(argv)
    chosen = [arms()[name] for name in dict.fromkeys(["demo", *args.arms])]
    torch.set_num_threads(args.threads or threads_per_process(preset_defaults("demo")[1]["cpu_processes"]))
    info = machine() | {"load_before": os.getloadavg(), "minutes": args.minutes}
    print(
        f"timing {len(chosen)} arms ({args.rounds} rounds × {args.timing_steps} steps, load {info['load_before']})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        seconds = time_steps(chosen, args.rounds, args.timing_steps, Path(tmp))
    info["load_after_timing"] = os.getloadavg()
    timed = seconds
    if args.steps:  # the timed ratios at the demo's unloaded step time
        seconds = {name: t * args.minutes * 60 / args.steps / timed["demo"] for name, t in timed.items()}
    budget = {a.name: max(1, round(args.minutes * 60 / seconds[a.name])) for a in chosen}
    for a in chosen:
        print(
            f"  {a.name:8s} {seconds[a.name] * 1e3:7.1f} ms/step → {budget[a.name]:,} steps in {args.minutes:g} min"
        )
    if args.time_only:
        return 0
    n = budget["demo"]
    jobs = [(a, budget[a.name]) for a in chosen] + [(a, n) for a in chosen if a.name != "demo"]
    done = []
    for path in args.reuse:
        earlier = json.loads(path.read_text())
        done += [*earlier["equal_time"].values(), *earlier["equal_tokens"].values()]
    runs = run_all(jobs, args.jobs, done)
    equal_time = {r["arm"]: r for r in runs[: len(chosen)]}
    equal_tokens = {"demo": equal_time["demo"]} | {r["arm"]: r for r in runs[len(chosen) :]}
    results = info | {
        "step_seconds": seconds, "timed_step_seconds": timed, "labels": {a.name: a.label for a in chosen},
        "equal_time": equal_time, "equal_tokens": equal_tokens,
        "xz_bits_per_byte": equal_time["demo"]["xz_bits_per_byte"], "load_after": os.getloadavg(),
        "baselines": equal_time["demo"].get("baselines"),
    }  # fmt: skip
    out = args.out or RESULTS / f"{info['date']}-{info['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, IMAGE)
    print(table(results))
    print(f"wrote {out} and {IMAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
