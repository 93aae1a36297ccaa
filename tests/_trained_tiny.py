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


def trained_tiny_checkpoint(tmp_path_factory):
    """That run's checkpoint, loaded: a model of its own per call (tests change engines' settings)."""
    from deepseek_lm.checkpoint import load_checkpoint

    return load_checkpoint(trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run"))


# prompts of different lengths and kinds for the batching tests: a batch mixes rows that join, finish and
# attend to different lengths
PROMPTS = [
    "The",
    "A function that returns the value of the attribute",
    "x = 1\n",
    "Return a list of all the names in the module, sorted by their position in the file and",
    "import",
    "class",
    "def get(self, key, default=None):",
    "The quick brown fox",
]
