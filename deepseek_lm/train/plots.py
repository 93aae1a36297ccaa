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


def plot_loss(run_dir: Path, out: Path, xz_bits_per_byte: float | None) -> Path:
    """Train and validation bits per byte (tokenizer-independent) with the xz baseline as a line."""
    plt = _pyplot()
    train, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r["step"] for r in train], [r["bits_per_byte"] for r in train], label="train", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["bits_per_byte"] for r in evals], "o-", label="validation")
    if xz_bits_per_byte is not None:
        ax.axhline(xz_bits_per_byte, color="gray", ls="--", label=f"xz -9 ({xz_bits_per_byte:.2f})")
    ax.set(xlabel="optimizer step", ylabel="bits per byte", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out, plt)


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


def plot_run(run_dir: Path, xz_bits_per_byte: float | None) -> list[Path]:
    """Write loss.png, lr.png and (for MoE models) expert_load.png into `run_dir`."""
    paths = [plot_loss(run_dir, run_dir / "loss.png", xz_bits_per_byte), plot_lr(run_dir, run_dir / "lr.png")]
    expert_load = expert_load_from_metrics(run_dir)
    if expert_load is not None:
        paths.append(plot_expert_load(expert_load, run_dir / "expert_load.png"))
    return paths
