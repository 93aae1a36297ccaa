"""Shared by the training tests: a tiny prepared data directory and tiny run configurations."""

from __future__ import annotations

import random
from pathlib import Path

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.train.config import TrainConfig, preset_defaults

WORDS = [
    "the",
    "a",
    "function",
    "returns",
    "value",
    "list",
    "of",
    "module",
    "class",
    "method",
    "object",
    "string",
    "number",
    "file",
    "data",
    "error",
]


def make_tiny_data(root: Path) -> Path:
    """~200 KB of word salad, prepared with a 300-token BPE by the data library (about a second)."""
    from deepseek_lm.data.preparation import PrepareConfig, prepare

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(120)) + "." for _ in range(300)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs))
    return prepare(PrepareConfig(out=str(root / "prep"), data=[str(corpus)], vocab_size=300, seq_len=32)).path


def tiny_configs(data_dir: Path, **overrides) -> tuple[DeepSeekConfig, TrainConfig]:
    """The `tiny` preset on `data_dir`: steps of 2 × 4 sequences of 32 tokens, no MFU matmul probe."""
    model, train = preset_defaults("tiny")
    train.update(data_dir=str(data_dir), peak_flops=1e12, sample_prompts=["The ", "A"], **overrides)
    return DeepSeekConfig.from_dict(model), TrainConfig.from_dict(train)
