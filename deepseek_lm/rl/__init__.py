"""Reinforcement learning with verifiable rewards (`deepseek-lm rl`): DeepSeek's GRPO on the trainer of
`train` and `finetune`, with rollouts through the batch engine of `serve`.

    from deepseek_lm.rl import RLConfig, rl
    result = rl("runs/chat", RLConfig.from_dict({**RLConfig().to_dict(), **RL_DEFAULTS}), "runs/rl")

Files: grpo.py (the objective's math), rewards.py (built-in checks, user rewards), data.py (the run's
prompts), rollout.py (sampling through the batch engine), objective.py (a step and an evaluation), evaluate.py
(held-out scores), session.py (a run), plots.py, cli.py. Names resolve lazily, so importing this package loads nothing heavy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"RLConfig": "config", "RL_DEFAULTS": "config", "rl": "session"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
