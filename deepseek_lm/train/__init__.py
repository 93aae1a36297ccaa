"""Training: configuration and presets, optimizer and schedule, the loop, checkpoints, monitoring, plots,
and data parallelism under torchrun.

    from deepseek_lm.train import TrainConfig, train
    result = train(model_config, TrainConfig(data_dir="data", max_steps=200), "runs/x")

Names resolve lazily, so importing this package loads nothing heavy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "TRAIN_PRESETS": "config",
    "train": "session",
    "TrainResult": "session",
    "TrainingDiverged": "session",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
