"""End-of-run PNG plots from `metrics.jsonl`: loss curves, learning rate, expert utilisation (layer × expert).

matplotlib is imported here only, with the non-interactive Agg backend, so training never needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepseek_lm.train.monitor import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(run_dir: Path, out: Path, baselines: dict[str, float] | None = None) -> Path:
    """Train and validation bits per byte (tokenizer-independent) with the compressors' baselines as lines
    (`baselines`: {"xz -9": 1.937, ...}, data.baselines.named); with
    multi-token prediction also each depth's loss, and below its top-1 agreement with the next token."""
    plt = _pyplot()
    train, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    mtp = [r for r in train if r.get("mtp_loss")]
    fig, axes = plt.subplots(2 if mtp else 1, figsize=(7, 7 if mtp else 4.2), sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["bits_per_byte"] for r in train], label="train", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["bits_per_byte"] for r in evals], "o-", label="validation")
    for k in range(len(mtp[0]["mtp_loss"]) if mtp else 0):  # nats -> bits per byte as the main loss's
        bpb = [r["mtp_loss"][k] * r["bits_per_byte"] / r["loss"] for r in mtp]
        ax.plot(
            [r["step"] for r in mtp], bpb, f"C{k + 2}", lw=1, alpha=0.8, label=f"MTP depth {k + 1} (train)"
        )
    for (name, value), style in zip((baselines or {}).items(), ("--", ":")):
        ax.axhline(value, color="gray", ls=style, label=f"{name} ({value:.3f})")
    ax.set(ylabel="bits per byte", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if mtp:
        _plot_mtp_top1(axes[1, 0], mtp, [r for r in evals if r.get("mtp_top1")])
    axes[-1, 0].set(xlabel="optimizer step")
    return _save(fig, out, plt)


def _plot_mtp_top1(ax, train: list[dict], evals: list[dict]) -> None:
    for k in range(len(train[0]["mtp_top1"])):  # the colours of the depths' losses above
        steps, top1 = [r["step"] for r in train], [r["mtp_top1"][k] for r in train]
        ax.plot(steps, top1, f"C{k + 2}", lw=1, label=f"depth {k + 1} (train)")
        if evals:
            steps, top1 = [r["step"] for r in evals], [r["mtp_top1"][k] for r in evals]
            ax.plot(steps, top1, f"C{k + 2}o--", label=f"depth {k + 1} (validation)")
    ax.set(ylabel="top-1 agreement", title="MTP drafts: argmax = next token (≈ acceptance rate)")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_lr(run_dir: Path, out: Path) -> Path:
    plt = _pyplot()
    train = read_metrics(run_dir, "train")
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    ax.grid(alpha=0.3)
    return _save(fig, out, plt)


def plot_expert_load(load: np.ndarray, out: Path) -> Path:
    """`load` (L, E): each MoE layer's share of routed tokens per expert over the run (rows sum to 1)."""
    plt = _pyplot()
    n_layers, n_experts = load.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_experts + 2), max(2.5, 0.45 * n_layers + 1.5)))
    image = ax.imshow(load, cmap="viridis", aspect="auto", vmin=0)
    if n_layers * n_experts <= 256:
        middle = load.max() / 2
        for (i, j), share in np.ndenumerate(load):
            color = "k" if share > middle else "w"  # dark text on viridis' light end
            ax.text(j, i, f"{share:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set(
        xlabel="routed expert",
        ylabel="MoE layer",
        title=f"Expert utilisation (even share {1 / n_experts:.2f})",
    )
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers))
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    return _save(fig, out, plt)


def _save(fig, out: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def expert_load_from_metrics(run_dir: Path) -> np.ndarray | None:
    """The mean of the logged per-window expert shares over the run, (L, E); None for a dense model."""
    loads = [r["expert_load"] for r in read_metrics(run_dir, "train") if r.get("expert_load")]
    return np.mean(np.array(loads, dtype=np.float64), axis=0) if loads else None


def plot_run(run_dir: Path, baselines: dict[str, float] | None = None) -> list[Path]:
    """Write loss.png, lr.png and (for MoE models) expert_load.png into `run_dir`."""
    paths = [plot_loss(run_dir, run_dir / "loss.png", baselines), plot_lr(run_dir, run_dir / "lr.png")]
    expert_load = expert_load_from_metrics(run_dir)
    if expert_load is not None:
        paths.append(plot_expert_load(expert_load, run_dir / "expert_load.png"))
    return paths
