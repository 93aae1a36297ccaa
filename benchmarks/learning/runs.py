"""Single runs of the demo's recipe with overrides, at any length, and their curves side by side: what round
two of the study measured beyond its arms (benchmarks/learning/README.md).

    python benchmarks/learning/runs.py run final --steps 1600                  # the demo's recipe, 1,600 steps
    python benchmarks/learning/runs.py run wd03 --steps 1600 --train weight_decay=0.3
    python benchmarks/learning/runs.py run library --steps 1600 --library-only
    python benchmarks/learning/runs.py plot results/round2/*.json              # table + PNG

A run is the study's (`study.run_arm`): step-scheduled, one thread, the demo's global batch in one process,
so the machine's load changes its duration, never its curve; it writes results/round2/NAME-STEPS.json with
the validation curve (10 batches, then the whole split) and the training batches' curve beside it.

`--library-only` trains on the built-in corpus without its test suites' documents (the training split
before they joined it), tokenised as the built-in corpus; the validation split is the same either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from study import RESULTS, ROOT, Arm, machine, run_arm  # this directory's study.py

ROUND2 = RESULTS / "round2"
IMAGE = ROOT / "docs" / "images" / "learning-round2.png"


def library_only(out: Path) -> Path:
    """The built-in corpus without its test suites' documents (the training split before they joined it;
    validation is the same either way), tokenised as the built-in corpus."""
    from deepseek_lm.data import builtin_documents, prepare_builtin
    from deepseek_lm.data.preparation import split_documents

    base = prepare_builtin().path
    manifest = json.loads((base / "manifest.json").read_text())
    split = manifest["splits"]["train"]
    ids = np.fromfile(base / "train.bin", dtype=manifest["dtype"])
    keep = split["documents"] - manifest["training_only_documents"]  # the library's come first
    end = int(np.flatnonzero(ids == manifest["eot_token_id"])[keep - 1]) + 1 if keep else 0
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    ids[:end].tofile(out / "train.bin")
    library_train, _, _ = split_documents(
        builtin_documents(), manifest["val_fraction"], manifest["split_seed"]
    )
    split.update(documents=keep, tokens=end, bytes=sum(len(d.encode()) for d in library_train))
    manifest.update(
        training_only_documents=0, cache_key="experiment", source=manifest["source"] + ", less them"
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def run(args: argparse.Namespace) -> None:
    train = dict(kv.split("=", 1) for kv in args.train)
    train = {k: json.loads(v) if v[:1] in "0123456789-[{tfn" else v for k, v in train.items()}
    if args.library_only:
        train["data_dir"] = str(library_only(ROOT / "data_cache" / "builtin-library-only"))
    result = run_arm(Arm(args.name, args.name, train=train), args.steps, 1)
    result |= {"overrides": train, "machine": machine()}
    ROUND2.mkdir(parents=True, exist_ok=True)
    out = ROUND2 / f"{args.name}-{args.steps}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.name}: {result['final_bits_per_byte']:.4f} bits/byte after {args.steps} steps; wrote {out}")


def plot(files: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(f.read_text()) for f in files]
    fig, ax = plt.subplots(figsize=(9, 5))
    print("| run | steps | tokens | validation (whole split) | training batches, last stretch | gap |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, r in enumerate(runs):
        tokens = r["tokens_per_step"] / 1e6
        label = f"{r['arm']} ({r['steps']} steps)"
        ax.plot([p["step"] * tokens for p in r["curve"]], [p["bits_per_byte"] for p in r["curve"]],
                "o-", ms=3, color=f"C{i}", label=f"{label}: validation")  # fmt: skip
        train, gap = r.get("train_curve") or [], "— | —"  # the study's earlier runs kept no training curve
        if train:
            ax.plot([p["step"] * tokens for p in train], [p["bits_per_byte"] for p in train], "--",
                    color=f"C{i}", lw=1, label=f"{label}: training batches")  # fmt: skip
            last = train[-1]["bits_per_byte"]
            gap = f"{last:.3f} | {r['final_bits_per_byte'] - last:.3f}"
        print(f"| {r['arm']} | {r['steps']:,} | {r['steps'] * tokens:.2f} M | {r['final_bits_per_byte']:.3f} | "
              f"{gap} |")  # fmt: skip
    # each corpus' own bars (the test suites' text lowered both compressors' figures too)
    bars = dict.fromkeys((name, value) for r in runs for name, value in (r.get("baselines") or {}).items())
    for name, value in bars:
        ax.axhline(
            value,
            color="gray",
            ls="--" if name.startswith("xz") else ":",
            lw=1,
            label=f"{name} ({value:.3f})",
        )
    ax.set(xlabel="million tokens", ylabel="bits per byte", ylim=(1.0, 2.6),
           title="Validation (whole split at the end) and training batches")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGE, dpi=110)
    print(f"wrote {IMAGE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one step-scheduled run")
    one.add_argument("name")
    one.add_argument("--steps", type=int, required=True)
    one.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides")
    one.add_argument("--library-only", action="store_true", help="see the module's docstring")
    many = sub.add_parser("plot", help="the runs' table and docs/images/learning-round2.png")
    many.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        plot(args.files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
