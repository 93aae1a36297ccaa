"""RL's data: the prompts a run trains and evaluates on, kept in its run directory, and the trainer's data
source over them.

`prepare_prompts` writes RUN/data once (so a run keeps the exact prompts it trained on and `--resume` reads
them back):

    train.jsonl, val.jsonl   prompt rows (data/tasks.py), the held-out ones never trained on
    manifest.json            the tasks or the prompt file, the user's reward (module:function) if any

`PromptData` renders every row through the chat template into prompt ids (the trainer's data source: path,
manifest, tokenizer, chat_template, train_loader), and `PromptLoader` hands out `prompts_per_step` rows a
step, from each task in turn, each task's rows in a new seeded order every pass; its whole state is the
number of rows handed out, so resume continues with exactly the next batch.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from deepseek_lm.data import DataError
from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.data.chat_data import builtin_chat_dir
from deepseek_lm.data.tasks import TASKS, check_tasks, needs_instruction_set, read_prompts, task_rows

log = logging.getLogger("deepseek_lm.data.prompts")  # the data layer's, which commands show on stderr

PROMPTS_FORMAT, PROMPTS_VERSION = "deepseek-lm-prompts", 1
USER_TASK = "prompts"  # the name the user's rows are reported under


def prepare_prompts(
    out: Path,
    *,
    tasks: list[str] | None = None,
    prompts: str | Path | None = None,
    reward: str | None = None,
    val_fraction: float = 0.05,
    split_seed: int = 0,
) -> Path:
    """Write the run's prompt directory `out`: the built-in `tasks` (default: all), or the user's `prompts`
    file split `val_fraction` held out (and `reward`, the spec that scores them)."""
    if prompts is not None and tasks:
        raise DataError("give --task or --prompts, not both")
    if prompts is not None:
        from deepseek_lm.data.preparation import split_documents

        rows = read_prompts(prompts)
        if len(rows) < 2:
            raise DataError(f"{prompts}: {len(rows)} usable prompt(s); need at least 2 (one is held out)")
        train, val, _ = split_documents(rows, val_fraction, split_seed)
        splits, source = {"train": train, "val": val}, f"prompts: {Path(prompts).name}"
    else:
        tasks = check_tasks(tasks or list(TASKS))
        chat = builtin_chat_dir() if needs_instruction_set(tasks) else None
        splits = {s: [r for name in tasks for r in task_rows(name, s, chat)] for s in ("train", "val")}
        source = f"built-in tasks: {', '.join(tasks)}"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, rows in splits.items():
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    manifest = {
        "format": PROMPTS_FORMAT, "version": PROMPTS_VERSION, "source": source, "tasks": tasks,
        "reward": reward, "splits": {s: {"prompts": len(rows)} for s, rows in splits.items()},
    }  # fmt: skip
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a prompt directory of an rl run ({e})") from None
    if (manifest.get("format"), manifest.get("version")) != (PROMPTS_FORMAT, PROMPTS_VERSION):
        raise DataError(f"{path}: not a {PROMPTS_FORMAT} v{PROMPTS_VERSION} directory")
    return manifest


class PromptData:
    """A run's prompt directory rendered for one model. `rows[split]` are the usable rows, each with its
    prompt `ids`; `by_task[split]` maps a task name to its rows' indices."""

    def __init__(self, path: str | Path, tokenizer: Any, chat_template: str | None, cfg: Any) -> None:
        """`cfg`: the run's RLConfig (prompts_per_step, seq_len, max_new_tokens)."""
        from deepseek_lm.data.tokenizer import special_token_ids

        self.path, self.tokenizer, self.prompts_per_step = Path(path), tokenizer, cfg.prompts_per_step
        self.format = ChatFormat.for_tokenizer(tokenizer, chat_template)
        self.chat_template = self.format.template
        manifest = read_manifest(self.path)
        self.reward_spec: str | None = manifest.get("reward")
        self.rows = {s: self._render(s, cfg.seq_len - cfg.max_new_tokens) for s in ("train", "val")}
        self.by_task = {s: _by_task(rows) for s, rows in self.rows.items()}
        ids = special_token_ids(tokenizer)
        counts = {
            s: {"prompts": len(r), "tokens": sum(len(x["ids"]) for x in r)} for s, r in self.rows.items()
        }
        self.manifest = {
            **manifest, "vocab_size": tokenizer.get_vocab_size(), "eot_token_id": ids["eot"],
            "pad_token_id": ids["pad"], "bos_token_id": ids["bos"], "splits": counts,
        }  # fmt: skip

    def _render(self, split: str, longest: int) -> list[dict[str, Any]]:
        file = self.path / f"{split}.jsonl"
        rows, too_long = [], []
        for line in file.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            row = json.loads(line)
            text = self.format.render(row["messages"])
            row["ids"] = self.tokenizer.encode(text, add_special_tokens=False).ids
            (rows if len(row["ids"]) <= longest else too_long).append(row)
        if too_long:
            log.warning(
                "%s: %d prompt(s) longer than %d tokens left out (e.g. %s); raise --train.seq_len to keep them",
                file, len(too_long), longest, too_long[0]["source"],
            )  # fmt: skip
        if not rows:
            raise DataError(
                f"{file}: no prompt fits train.seq_len minus train.max_new_tokens ({longest} tokens)"
            )
        return rows

    def train_loader(
        self, seq_len: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> PromptLoader:
        """Batches of `prompts_per_step` rows (`batch_size`, the micro-batch, is the updates' business)."""
        if world_size > 1:
            raise DataError("rl runs in one process: start it without torchrun")
        return PromptLoader(list(self.by_task["train"].values()), self.prompts_per_step, seed)


def _by_task(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        out.setdefault(row["task"] or USER_TASK, []).append(i)
    return out


class PromptLoader:
    """Endless batches of row indices: the j-th row handed out comes from task j mod K, the next of that
    task's rows in its seeded order of the current pass over them."""

    def __init__(self, groups: list[list[int]], batch_size: int, seed: int) -> None:
        self.groups, self.batch_size, self.seed = groups, batch_size, seed
        self.drawn = 0
        self.batches_per_epoch = max(1, sum(map(len, groups)) // batch_size)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # task -> (pass, its order in that pass)

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list[int]:
        batch = [self._row(self.drawn + i) for i in range(self.batch_size)]
        self.drawn += self.batch_size
        return batch

    def _row(self, j: int) -> int:
        g = j % len(self.groups)
        group = self.groups[g]
        epoch, i = divmod(j // len(self.groups), len(group))
        if self._orders.get(g, (None,))[0] != epoch:
            self._orders[g] = epoch, np.random.default_rng([self.seed, g, epoch]).permutation(len(group))
        return group[int(self._orders[g][1][i])]

    def state_dict(self) -> dict[str, Any]:
        return {
            "drawn": self.drawn,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "rows": sum(map(len, self.groups)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seed", "batch_size", "rows") if state.get(k) != mine[k]]
        if changed:
            diffs = ", ".join(f"{k} {state.get(k)} -> {mine[k]}" for k in changed)
            raise DataError(
                f"cannot resume the prompt order exactly: {diffs}; resume with the run's own settings"
            )
        self.drawn = int(state["drawn"])
