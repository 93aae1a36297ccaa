"""RL's end-of-run plots, from `metrics.jsonl`: rewards (the rollouts' and each task's held-out), KL and
completion length; the experts' load."""

from __future__ import annotations

from pathlib import Path

from deepseek_lm.train.monitor import read_metrics
from deepseek_lm.train.plots import _pyplot, _save, expert_load_from_metrics, plot_expert_load


def plot_rl(run_dir: Path) -> list[Path]:
    """Write reward.png (and for MoE models expert_load.png, as training does) into `run_dir`."""
    paths = [plot_rewards(run_dir)]
    expert_load = expert_load_from_metrics(run_dir)
    if expert_load is not None:
        paths.append(plot_expert_load(expert_load, run_dir / "expert_load.png"))
    return paths


def plot_rewards(run_dir: Path) -> Path:
    plt = _pyplot()
    train, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    fig, axes = plt.subplots(3, figsize=(7, 8), sharex=True, height_ratios=[2, 1, 1])
    steps = [r["step"] for r in train]
    mean = [r["reward"] for r in train]
    spread = [r["reward_std"] for r in train]
    ax = axes[0]
    ax.plot(steps, mean, "k", lw=1, label="rollouts (sampled)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                    color="k", alpha=0.1, lw=0)  # fmt: skip
    tasks = [k[len("reward_") :] for k in (evals[0] if evals else {}) if k.startswith("reward_")]
    for i, task in enumerate(tasks):
        ax.plot(
            [r["step"] for r in evals],
            [r[f"reward_{task}"] for r in evals],
            f"C{i}o-",
            label=f"held-out {task} (greedy)",
        )
    ax.set(ylabel="reward", title="GRPO: rewards")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax, key, label in ((axes[1], "kl", "KL to the reference"), (axes[2], "length", "completion tokens")):
        ax.plot(steps, [r[key] for r in train], lw=1)
        ax.set(ylabel=label)
        ax.grid(alpha=0.3)
    axes[-1].set(xlabel="step (one rollout batch)")
    return _save(fig, run_dir / "reward.png", plt)
