"""Rewards: the built-in tasks' checks, the user's `module:function`, and calling either so that a broken
reward is one line naming it and the prompt.

A reward is `f(prompt, completion, **fields) -> float`: `prompt` the row's prompt as given (its text, or its
messages), `completion` the model's reply (text, the end of turn excluded), `fields` the row's other keys
(the built-in tasks': `answer`, the reference reply). Built-in rewards, each between 0 and 1:

| task       | reward                                                                          |
|------------|---------------------------------------------------------------------------------|
| module     | 1 when the module the reply names ("`X` is in the `M` module.", or `M` alone) is the reference's |
| signature  | 1 when the reply is the reference signature (backticks and surrounding spaces aside)           |
| functions  | F1 between the names the reply lists in backticks and the reference's                          |
| arithmetic | 1 when the reply is the number                                                                  |
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepseek_lm.errors import UserError

RewardFn = Callable[..., float]


class RewardError(UserError):
    """A reward function raised or returned something that is not a finite number."""


def answer_text(text: str) -> str:
    """A reply as the built-in checks compare it: stripped, inner runs of whitespace as one space."""
    return re.sub(r"\s+", " ", text.strip())


def exact_match(completion: str, answer: str) -> bool:
    return answer_text(completion) == answer_text(answer)


def _module_named(text: str) -> str | None:
    found = re.search(r"in the `([\w.]+)` module", text)
    if found:
        return found[1]
    bare = answer_text(text).strip("`.")
    return bare if re.fullmatch(r"[A-Za-z_][\w.]*", bare) else None


def module_reward(prompt: Any, completion: str, answer: str, **_: Any) -> float:
    named = _module_named(completion)
    return float(named is not None and named == _module_named(answer))


def signature_reward(prompt: Any, completion: str, answer: str, **_: Any) -> float:
    return float(answer_text(completion).strip("`") == answer_text(answer).strip("`"))


def functions_reward(prompt: Any, completion: str, answer: str, **_: Any) -> float:
    said, wanted = set(re.findall(r"`([^`\s]+)`", completion)), set(re.findall(r"`([^`\s]+)`", answer))
    hits = len(said & wanted)
    if not hits:
        return 0.0
    precision, recall = hits / len(said), hits / len(wanted)
    return 2 * precision * recall / (precision + recall)


def arithmetic_reward(prompt: Any, completion: str, answer: str, **_: Any) -> float:
    return float(answer_text(completion) == answer)


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "module": module_reward,
    "signature": signature_reward,
    "functions": functions_reward,
    "arithmetic": arithmetic_reward,
}


def load_reward(spec: str) -> RewardFn:
    """`package.module:function`, or `path/to/file.py:function`; the current directory is importable, as
    for `python -m`. A spec that does not resolve to a callable is a `UserError` naming it."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise UserError(f"--reward {spec}: expected module:function (e.g. my_rewards:exact)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: anything may go wrong in it
        raise UserError(f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"--reward {spec}: {module_name} has no function {func_name}")
    return fn


def call_reward(name: str, fn: RewardFn, row: dict[str, Any], completion: str) -> float:
    """`fn(prompt, completion, **fields)` as a float; anything else is a `RewardError` naming the function
    and the prompt."""
    where = f"reward {name} on the prompt {_short(row['prompt'])} ({row['source']})"
    try:
        value = fn(row["prompt"], completion, **row["fields"])
    except Exception as e:  # the user's code: anything may go wrong in it
        raise RewardError(f"{where} raised {type(e).__name__}: {e}") from None
    if not isinstance(value, numbers.Real):
        raise RewardError(f"{where} returned {_short(value)} ({type(value).__name__}), not a number")
    if not math.isfinite(value):
        raise RewardError(f"{where} returned {value}: a reward must be a finite number")
    return float(value)


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    if not isinstance(value, str) and isinstance(value, list):  # messages: the last user turn says enough
        text = str(value[-1].get("content", "")) if value and isinstance(value[-1], dict) else text
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
