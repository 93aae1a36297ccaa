"""Held-out scores: greedy replies to prompts, their mean reward and exact-match share per task. The same
code scores a run's periodic evaluations (objective.py) and any checkpoint (`score_checkpoint`, for the
benchmarks: an SFT model, TRL's result imported back)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepseek_lm.rl.rewards import BUILTIN_REWARDS, RewardFn, call_reward, exact_match
from deepseek_lm.rl.rollout import Rollouts


def score(
    rollouts: Rollouts,
    picked: dict[str, list[dict[str, Any]]],
    reward_of: Callable[[dict[str, Any]], tuple[str, RewardFn]],
    max_new_tokens: int,
) -> dict[str, float]:
    """`picked`: task -> prompt rows (with their `ids`). Per task reward_TASK, exact_TASK (rows with an
    `answer` field) and prompts_TASK; `reward` and `exact` are the means over tasks."""
    rows = [r for rs in picked.values() for r in rs]
    completions = rollouts.sample([r["ids"] for r in rows], max_new_tokens, 0.0, None)
    metrics: dict[str, float] = {}
    at = 0
    for task, task_rows in picked.items():
        n, pairs = len(task_rows), list(zip(task_rows, completions[at : at + len(task_rows)]))
        metrics[f"reward_{task}"] = sum(call_reward(*reward_of(r), r, c.text) for r, c in pairs) / n
        if all("answer" in r["fields"] for r in task_rows):
            metrics[f"exact_{task}"] = (
                sum(exact_match(c.text, str(r["fields"]["answer"])) for r, c in pairs) / n
            )
        metrics[f"prompts_{task}"] = n
        at += n
    tasks = list(picked)
    metrics["reward"] = sum(metrics[f"reward_{k}"] for k in tasks) / len(tasks)
    exact = [metrics[f"exact_{k}"] for k in tasks if f"exact_{k}" in metrics]
    if exact:
        metrics["exact"] = sum(exact) / len(exact)
    return metrics


def score_checkpoint(
    checkpoint: str | Path,
    tasks: list[str],
    *,
    max_new_tokens: int = 64,
    limit: int | None = None,
    slots: int = 64,
) -> dict[str, float]:
    """A checkpoint's greedy held-out scores on built-in tasks (each task's first `limit` prompts; all:
    None), through its chat template."""
    from deepseek_lm.checkpoint import load_checkpoint
    from deepseek_lm.data.chat import ChatFormat
    from deepseek_lm.data.chat_data import builtin_chat_dir
    from deepseek_lm.data.tasks import needs_instruction_set, task_rows

    ckpt = load_checkpoint(checkpoint)
    fmt = ChatFormat.for_tokenizer(ckpt.tokenizer, ckpt.chat_template)
    picked, chat = {}, builtin_chat_dir() if needs_instruction_set(tasks) else None
    for task in tasks:
        rows = task_rows(task, "val", chat)[:limit]
        for row in rows:
            row["ids"] = ckpt.tokenizer.encode(fmt.render(row["messages"]), add_special_tokens=False).ids
        picked[task] = rows
    context = max(len(r["ids"]) for rs in picked.values() for r in rs) + max_new_tokens
    rollouts = Rollouts(ckpt.model, ckpt.tokenizer, fmt, slots, context)
    try:
        return score(
            rollouts, picked, lambda row: (row["task"], BUILTIN_REWARDS[row["task"]]), max_new_tokens
        )
    finally:
        rollouts.close()
