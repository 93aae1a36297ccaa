"""Prompts with checkable answers: the built-in verifiable tasks, and the user's prompts for RL (`deepseek-lm rl`).

A prompt row, as `rl` trains on it and as a prepared prompt directory stores it (one JSON object a line):

    {"task": "module", "messages": [{"role": "user", "content": "Which module provides `dumps`?"}],
     "prompt": <the row's prompt as given>, "fields": {"answer": "json"}, "source": "train.jsonl:12"}

Built-in tasks (`TASKS`), each with a held-out split that training never sees:
- module:     "Which module provides `X`?"        → the module's name (exact);
- signature:  "What arguments does `X` take?"      → the call signature `mod.X(a, b=1)` (exact);
- functions:  "Which functions does `M` provide?"  → the listed names (F1 over them);
- arithmetic: "What is 17 + 25?"                   → "42" (sums and differences of 0..ARITHMETIC_MAX).
The first three are the built-in instruction set's single-turn questions of those kinds (data/instructions.py),
split by module as it is (so held-out questions are about modules the model never saw answered); the
arithmetic problems are all pairs of operands, split by a hash of the problem. `task_conversations` gives the
same rows with their reference answers as chat conversations: the supervised warm-up on a task's format.

The user's prompts: JSONL rows with a "prompt" (text, sent as the user message) or OpenAI-style "messages"
(ending with a user turn); every other key is a field passed to the reward (`answer`, test cases, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from deepseek_lm.data import DataError
from deepseek_lm.data.chat import check_messages
from deepseek_lm.errors import UserError

log = logging.getLogger(__name__)

TASKS = ("module", "signature", "functions", "arithmetic")
# the instruction set's conversation ids end with the kind of question (data/instructions.py)
_KIND_OF_TASK = {"module": "where", "signature": "args", "functions": "functions"}
ARITHMETIC_MAX = 50  # operands 0..50: sums to 100; a difference keeps its larger operand first (>= 0)
ARITHMETIC_VAL_EVERY = 10  # one problem in ten (by hash) is held out
_ASK_ARITHMETIC = ("What is {} {} {}?", "Compute {} {} {}.", "{} {} {} = ?")


def check_tasks(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"--task {','.join(unknown) or '(none)'}: choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _row(task: str | None, messages: list[dict], prompt: Any, fields: dict, source: str) -> dict[str, Any]:
    return {"task": task, "messages": messages, "prompt": prompt, "fields": fields, "source": source}


# ---------------------------------------------------------------------------------------------------------
# the built-in tasks


def task_rows(name: str, split: str, chat_dir: Any = None) -> list[dict[str, Any]]:
    """The prompt rows of a built-in task's `split` ("train" | "val"). `chat_dir`: the prepared built-in
    instruction set (`chat_data.builtin_chat_dir()`), which every task but arithmetic is read from."""
    if name == "arithmetic":
        return arithmetic_rows(split)
    if chat_dir is None:
        raise ValueError(
            f"the {name} task is read from the built-in instruction set: pass its chat directory"
        )
    kind, rows = _KIND_OF_TASK[name], []
    for conv in chat_dir.conversations(split):
        messages = conv["messages"]
        if (
            conv.get("id", "").rsplit(":", 1)[-1] != kind
            or sum(m["role"] == "assistant" for m in messages) != 1
        ):
            continue
        question, answer = messages[:-1], messages[-1]["content"]
        rows.append(_row(name, question, question[-1]["content"], {"answer": answer}, conv["source"]))
    return rows


def needs_instruction_set(names: list[str]) -> bool:
    return any(name != "arithmetic" for name in names)


def arithmetic_rows(split: str) -> list[dict[str, Any]]:
    rows = []
    for a in range(ARITHMETIC_MAX + 1):
        for b in range(ARITHMETIC_MAX + 1):
            for op in ("+", "-"):
                if op == "-" and b > a:
                    continue
                key = f"{a} {op} {b}"
                digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
                if ("val" if digest % ARITHMETIC_VAL_EVERY == 0 else "train") != split:
                    continue
                question = _ASK_ARITHMETIC[(digest >> 8) % len(_ASK_ARITHMETIC)].format(a, op, b)
                answer = str(a + b if op == "+" else a - b)
                messages = [{"role": "user", "content": question}]
                rows.append(_row("arithmetic", messages, question, {"answer": answer}, f"arithmetic:{key}"))
    return rows


def task_conversations(names: list[str], split: str, chat_dir: Any = None) -> list[dict[str, Any]]:
    """The tasks' prompts with their reference answers as chat conversations ({"id", "messages"}): what
    `finetune --task` trains on, so the model learns each task's answer format before RL rewards it."""
    out = []
    for name in check_tasks(names):
        for row in task_rows(name, split, chat_dir):
            reply = {"role": "assistant", "content": row["fields"]["answer"]}
            out.append({"id": f"{row['source']}:{name}", "messages": [*row["messages"], reply]})
    return out


# ---------------------------------------------------------------------------------------------------------
# the user's prompts


def check_prompt_row(row: Any) -> tuple[list[dict], Any, dict]:
    """A JSONL row → (messages ending with a user turn, the prompt as given, the reward's fields), or a
    `UserError` saying what is wrong."""
    if not isinstance(row, dict):
        raise UserError(f"not a JSON object but a {type(row).__name__}")
    if "prompt" in row and "messages" in row:
        raise UserError("has both 'prompt' and 'messages': give one")
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages, prompt = [{"role": "user", "content": row["prompt"]}], row["prompt"]
    elif "messages" in row:
        messages = check_messages(row["messages"])
        if messages[-1]["role"] != "user":
            raise UserError("its messages must end with a user turn (the model writes the reply)")
        prompt = row["messages"]
    else:
        raise UserError('needs a "prompt" (non-empty text) or "messages" (ending with a user turn)')
    fields = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    if bad := [k for k in fields if not k.isidentifier() or k in ("prompt", "completion")]:
        raise UserError(f"field {bad[0]!r} cannot be passed to a reward as a keyword argument")
    return messages, prompt, fields


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The usable rows of a prompt JSONL file; each bad line is a warning naming it, no usable line a
    `DataError`."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    rows, bad, lines = [], 0, 0
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        lines += 1
        try:
            messages, prompt, fields = check_prompt_row(json.loads(line))
        except (json.JSONDecodeError, UserError) as e:
            bad += 1
            log.warning("%s:%d: skipped: %s", path, lineno, getattr(e, "msg", None) or e)
            continue
        rows.append(_row(None, messages, prompt, fields, f"{path.name}:{lineno}"))
    if not rows:
        raise DataError(
            f"{path}: none of its {lines} line(s) is a usable prompt; each must be "
            '{"prompt": "..."} or {"messages": [...]} plus the fields your reward reads'
        )
    if bad:
        log.warning(
            "%s: skipped %d of %d lines (each named above); %d prompts kept", path, bad, lines, len(rows)
        )
    return rows
