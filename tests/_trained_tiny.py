"""A tiny model trained for a few dozen steps, shared by the generation and eval tests.

Trained once per test process (memoised) with the training library, on the training tests' tiny data.
"""

from __future__ import annotations

import functools
from pathlib import Path

from train_helpers import make_tiny_data, tiny_configs


@functools.cache
def trained_tiny_run(root: Path) -> Path:
    """The run directory of the `tiny` preset trained for 40 steps (a final checkpoint and metrics.jsonl),
    with one multi-token-prediction module (plain decoding never runs it; speculative decoding drafts
    with it)."""
    from deepseek_lm.train import train

    root.mkdir(parents=True, exist_ok=True)
    model_config, train_config = tiny_configs(
        make_tiny_data(root), max_steps=40, save_every=40, eval_every=20
    )
    model_config.num_nextn_predict_layers = 1
    train(model_config, train_config, root / "run")
    return root / "run"
