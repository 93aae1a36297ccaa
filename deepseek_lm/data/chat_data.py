"""Conversations for fine-tuning: read and check them, prepare a chat directory, and feed the trainer.

Input: OpenAI-style chat JSONL, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line (other keys
are ignored), or a Hugging Face dataset with a messages column. A line that is not a usable conversation is
named with its line number in a warning of its own and counted in a summary; none is skipped silently.

A prepared chat directory (`deepseek-lm prepare --chat`, or what `finetune --data FILE.jsonl` writes into its
run directory) holds the checked conversations split by conversation (the built-in set: by module):

    train.jsonl, val.jsonl   one {"messages": [...]} per line ("id" / "source" say where it came from)
    manifest.json            source, split, counts; written last, the directory renamed into place when done

`ChatData` is the trainer's data source for fine-tuning: it renders every conversation through the chat
template and tokenises it into ids and a loss mask (`ChatFormat.encode`: only the assistant's tokens), then
`ChatLoader` batches them, packed several to a window (`doc_ids` keep their attention apart and restart their
positions) or one per row, padded. Legend: B rows, T window (seq_len).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepseek_lm.data import DataError
from deepseek_lm.data.chat import ChatFormat, check_messages
from deepseek_lm.errors import UserError

log = logging.getLogger(__name__)

CHAT_FORMAT, CHAT_FORMAT_VERSION = "deepseek-lm-chat", 1
SPLITS = ("train", "val")
IGNORE_INDEX = -100  # targets the loss skips (model/loss.py)


# ---------------------------------------------------------------------------------------------------------
# reading and checking


def check_conversation(row: Any, field: str = "messages") -> dict[str, Any]:
    """A row → {"messages": checked messages} (its "id" kept), or a `UserError` saying what is wrong."""
    if not isinstance(row, dict):
        raise UserError(f"not a JSON object but a {type(row).__name__}")
    if field not in row:
        raise UserError(f"no {field!r} field (found: {', '.join(map(str, row)) or 'nothing'})")
    messages = check_messages(row[field])
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("no assistant message: nothing to learn from")
    conv: dict[str, Any] = {"messages": messages}
    if isinstance(row.get("id"), str):
        conv["id"] = row["id"]
    return conv


def read_chat_jsonl(path: str | Path, field: str = "messages") -> list[dict[str, Any]]:
    """The usable conversations of a chat JSONL file, each with its "source" (file:line). Every bad line is
    a warning naming it; a summary counts them; a file with no usable line is a `DataError`."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    convs, bad, lines = [], 0, 0
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is legal inside JSON
        if not line.strip():
            continue
        lines += 1
        try:
            conv = check_conversation(json.loads(line), field)
        except json.JSONDecodeError as e:
            conv, why = None, f"not valid JSON ({e.msg})"
        except UserError as e:
            conv, why = None, str(e)
        if conv is None:
            bad += 1
            log.warning("%s:%d: skipped: %s", path, lineno, why)
        else:
            convs.append({**conv, "source": f"{path.name}:{lineno}"})
    _report(str(path), "line", lines, bad, field, len(convs))
    return convs


def _report(what: str, unit: str, total: int, bad: int, field: str, good: int) -> None:
    if good == 0:
        raise DataError(
            f"{what}: none of its {total} {unit}(s) is a usable conversation"
            + (" (each is named above)" if bad else "")
            + f'; each must be {{"{field}": [{{"role": ..., "content": ...}}, ...]}} with an assistant message'
        )
    if bad:
        log.warning(
            "%s: skipped %d of %d %ss (each named above); %d conversations kept", what, bad, total, unit, good
        )


def dataset_conversations(
    name: str, *, config: str | None = None, split: str = "train", field: str = "messages",
    max_conversations: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Conversations from a Hugging Face dataset with a messages column (streamed), or a local dataset
    directory; offline, a Hub name fails at once with one line. Bad rows are named like bad lines."""
    from deepseek_lm.data.sources import hub_unreachable_reason

    if not Path(name).exists() and (reason := hub_unreachable_reason()):
        raise DataError(f"--dataset {name}: {reason}; connect to the network or give local files with --data")
    import datasets

    convs, bad, rows = [], 0, 0
    try:
        for i, row in enumerate(datasets.load_dataset(name, config, split=split, streaming=True)):
            if max_conversations is not None and len(convs) >= max_conversations:
                break
            rows += 1
            try:
                convs.append({**check_conversation(row, field), "source": f"{name} row {i}"})
            except UserError as e:
                bad += 1
                log.warning("--dataset %s: row %d: skipped: %s", name, i, e)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"--dataset {name}: could not load it ({type(e).__name__}: {first_line})") from None
    _report(f"--dataset {name}", "row", rows, bad, field, len(convs))
    return convs


# ---------------------------------------------------------------------------------------------------------
# prepared chat directories


@dataclass
class ChatPrepareConfig:
    """What `prepare --chat` prepares: the built-in instruction set, chat JSONL files, a dataset, or the
    built-in verifiable tasks' questions with their reference answers (data/tasks.py)."""

    out: str | None = None  # default for the built-in set: data_cache/chat
    data: list[str] | None = None  # chat .jsonl files (directories and globs of them)
    tasks: list[str] | None = (
        None  # built-in tasks (module, signature, functions, arithmetic), split as they are
    )
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    messages_field: str = "messages"
    max_conversations: int | None = None  # from --dataset
    val_fraction: float = 0.05
    split_seed: int = 0
    force: bool = False

    def __post_init__(self) -> None:
        if sum(map(bool, (self.data, self.dataset, self.tasks))) > 1:
            raise DataError("give one of --data, --dataset and --task")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"--val-fraction {self.val_fraction}: must lie strictly between 0 and 1")


@dataclass
class ChatDir:
    """A finished prepared chat directory: `ChatDir.open(path)`; `reused` says the cache was hit."""

    path: Path
    manifest: dict
    reused: bool = field(default=False, compare=False)

    @classmethod
    def open(cls, path: str | Path) -> ChatDir:
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise DataError(
                f"{path}: not a prepared chat directory (no manifest.json); make one with "
                f"`deepseek-lm prepare --chat [--data chats.jsonl] --out {path}`"
            ) from None
        except (ValueError, OSError) as e:
            raise DataError(
                f"{path / 'manifest.json'}: unreadable ({e}); prepare it again with --force"
            ) from None
        if not is_chat_manifest(manifest):
            raise DataError(f"{path}: not a {CHAT_FORMAT} v{CHAT_FORMAT_VERSION} directory")
        for split in SPLITS:
            if not (path / f"{split}.jsonl").is_file():
                raise DataError(f"{path / split}.jsonl: missing; prepare the directory again with --force")
        return cls(path, manifest)

    def conversations(self, split: str) -> list[dict[str, Any]]:
        """The split's conversations, as written (checked when prepared, checked again here)."""
        file = self.path / f"{split}.jsonl"
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").split("\n") if line.strip()]
        out = []
        for i, row in enumerate(rows, 1):
            conv = check_conversation(row)
            conv["source"] = row.get("source") or f"{file.name}:{i}"
            out.append(conv)
        return out


def is_chat_manifest(manifest: Any) -> bool:
    return isinstance(manifest, dict) and (manifest.get("format"), manifest.get("version")) == (
        CHAT_FORMAT,
        CHAT_FORMAT_VERSION,
    )


def is_chat_dir(path: str | Path) -> bool:
    try:
        return is_chat_manifest(json.loads((Path(path) / "manifest.json").read_text()))
    except (OSError, ValueError):
        return False


def builtin_chat_dir() -> ChatDir:
    """The built-in instruction set, prepared in data_cache/chat on first use (then reused)."""
    return prepare_chat(ChatPrepareConfig())


def default_chat_dir() -> Path:
    """Where the built-in instruction set is prepared by default: ./data_cache/chat."""
    return Path.cwd() / "data_cache" / "chat"


def prepare_chat(cfg: ChatPrepareConfig) -> ChatDir:
    """Read, check and split `cfg`'s conversations into a chat directory (reused when its inputs match)."""
    from deepseek_lm.data.preparation import _check_replaceable, _staging

    start = time.perf_counter()
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    source, inputs, read = _chat_source(cfg)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "data", "force")}
    key = hashlib.sha256(
        json.dumps([CHAT_FORMAT_VERSION, inputs, settings], sort_keys=True).encode()
    ).hexdigest()
    if not cfg.force and is_chat_dir(out):
        cached = ChatDir.open(out)
        if cached.manifest.get("cache_key") == key:
            return ChatDir(cached.path, cached.manifest, reused=True)
    _check_replaceable(out)
    splits, how = read()
    with _staging(out) as tmp:
        for split, convs in splits.items():
            (tmp / f"{split}.jsonl").write_text(
                "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs)
            )
        manifest = {
            "format": CHAT_FORMAT,
            "version": CHAT_FORMAT_VERSION,
            "source": source,
            "inputs": inputs,
            "cache_key": key,
            "split": how,
            "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed,
            "splits": {split: _counts(convs) for split, convs in splits.items()},
            "prepare_seconds": round(time.perf_counter() - start, 2),
            "python": sys.version.split()[0],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return ChatDir.open(out)


def _default_out(cfg: ChatPrepareConfig) -> Path:
    if cfg.data or cfg.dataset or cfg.tasks:
        raise DataError("--out DIR is required with --data or --dataset")
    return default_chat_dir()


def _chat_source(cfg: ChatPrepareConfig):
    """(description, fingerprint of the inputs, reader → ({split: conversations}, how it was split))."""
    from deepseek_lm.data import sources as src

    if cfg.data:
        paths = src.resolve_paths(cfg.data)
        if bad := [p for p in paths if p.suffix.lower() != ".jsonl"]:
            raise DataError(f'{bad[0]}: chat data must be .jsonl files of {{"messages": [...]}} lines')
        read = lambda: [c for p in paths for c in read_chat_jsonl(p, cfg.messages_field)]  # noqa: E731
        names = ", ".join(p.name for p in paths[:5]) + (", ..." if len(paths) > 5 else "")
        return f"chat files: {names}", {"files": src.files_fingerprint(paths)}, lambda: _split(read(), cfg)
    if cfg.dataset:
        inputs = {
            k: getattr(cfg, k) for k in ("dataset", "dataset_config", "dataset_split", "max_conversations")
        }

        def read_dataset():
            convs = dataset_conversations(
                cfg.dataset, config=cfg.dataset_config, split=cfg.dataset_split, field=cfg.messages_field,
                max_conversations=cfg.max_conversations,
            )  # fmt: skip
            return _split(convs, cfg)

        return f"hf: {cfg.dataset}", inputs, read_dataset
    from deepseek_lm.data.instructions import INSTRUCTIONS_VERSION, instruction_set

    if cfg.tasks:
        from deepseek_lm.data import tasks as T

        names = T.check_tasks(cfg.tasks)
        inputs = {**src.builtin_fingerprint(), "instructions": INSTRUCTIONS_VERSION, "tasks": names,
                  "arithmetic_max": T.ARITHMETIC_MAX}  # fmt: skip

        def read_tasks():
            chat = builtin_chat_dir() if T.needs_instruction_set(names) else None
            return {s: T.task_conversations(names, s, chat) for s in SPLITS}, "the tasks' own split"

        return f"built-in tasks: {', '.join(names)}", inputs, read_tasks

    source = f"builtin: Python {sys.version.split()[0]} standard-library instruction set"
    inputs = {**src.builtin_fingerprint(), "instructions": INSTRUCTIONS_VERSION}
    how = "by module, as the built-in corpus"
    return source, inputs, lambda: (instruction_set(cfg.val_fraction, cfg.split_seed), how)


def _split(convs: list[dict], cfg: ChatPrepareConfig) -> tuple[dict[str, list[dict]], str]:
    from deepseek_lm.data.preparation import split_documents

    if len(convs) < 2:
        raise DataError(
            f"{len(convs)} usable conversation(s): need at least 2 (one is held out for validation)"
        )
    train, val, _ = split_documents(convs, cfg.val_fraction, cfg.split_seed)
    return {"train": train, "val": val}, "by conversation"


def _counts(convs: list[dict]) -> dict[str, int]:
    answers = [m["content"] for c in convs for m in c["messages"] if m["role"] == "assistant"]
    return {
        "conversations": len(convs),
        "assistant_turns": len(answers),
        "answer_bytes": sum(len(a.encode()) for a in answers),
    }


# ---------------------------------------------------------------------------------------------------------
# tokenised conversations: the trainer's data source


@dataclass
class Example:
    """One conversation as the model trains on it: inputs ids[:-1], targets ids[1:] where an assistant
    wrote them (else IGNORE_INDEX)."""

    x: np.ndarray  # (n - 1,) int64
    y: np.ndarray  # (n - 1,) int64
    answer_bytes: int  # UTF-8 bytes of the assistant contents
    source: str  # file:line, for messages

    @property
    def answer_tokens(self) -> int:
        return int((self.y != IGNORE_INDEX).sum())


def tokenize(convs: list[dict], fmt: ChatFormat, tokenizer: Any) -> list[Example]:
    examples = []
    for conv in convs:
        ids, mask = fmt.encode(tokenizer, conv["messages"])
        ids_n = np.asarray(ids, dtype=np.int64)
        y = np.where(np.asarray(mask[1:], dtype=bool), ids_n[1:], IGNORE_INDEX)
        answer_bytes = sum(len(m["content"].encode()) for m in conv["messages"] if m["role"] == "assistant")
        examples.append(Example(ids_n[:-1], y, answer_bytes, conv["source"]))
    return examples


class ChatData:
    """A prepared chat directory tokenised for one model: what the trainer reads when fine-tuning (the same
    members as `PreparedData`: path, manifest, tokenizer, chat_template, bytes_per_token, train_loader,
    val_batches)."""

    def __init__(
        self, chat_dir: ChatDir, tokenizer: Any, chat_template: str | None, *, packing: bool = True
    ) -> None:
        from deepseek_lm.data.tokenizer import special_token_ids

        self.chat_dir, self.tokenizer, self.packing, self.path = chat_dir, tokenizer, packing, chat_dir.path
        self.format = ChatFormat.for_tokenizer(tokenizer, chat_template)  # None: the one the tokenizer suits
        self.chat_template = self.format.template
        self._val: dict[int, tuple[list[Example], list[list[int]]]] = {}  # seq_len -> examples, windows
        self.examples = {s: tokenize(chat_dir.conversations(s), self.format, tokenizer) for s in SPLITS}
        ids = special_token_ids(tokenizer)
        self.pad_id = ids["pad"] if ids["pad"] is not None else 0
        self.manifest = {
            "source": chat_dir.manifest.get("source"),
            "vocab_size": tokenizer.get_vocab_size(),
            "eot_token_id": ids["eot"],
            "pad_token_id": ids["pad"],
            "bos_token_id": ids["bos"],
            "splits": {s: _token_counts(ex) for s, ex in self.examples.items()},
            "xz_bits_per_byte": None,
        }

    def bytes_per_token(self, split: str) -> float:
        """Answer bytes per answer token: bits per byte of the held-out answers, whatever the tokenizer."""
        s = self.manifest["splits"][split]
        return s["answer_bytes"] / max(s["answer_tokens"], 1)

    def train_loader(self, seq_len: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        return ChatLoader(
            self.examples["train"], seq_len, batch_size, self.pad_id,
            seed=seed, rank=rank, world_size=world_size, packing=self.packing,
        )  # fmt: skip

    def val_batches(self, seq_len: int, batch_size: int, max_batches: int | None = None) -> Iterator[tuple]:
        """The validation conversations in order (packed or padded as in training), batches of up to
        `batch_size` rows."""
        if seq_len not in self._val:  # the windows are fixed: warn about long conversations once
            examples = fit_to_window(self.examples["val"], seq_len, "val")
            windows = pack(examples, seq_len) if self.packing else [[i] for i in range(len(examples))]
            self._val[seq_len] = examples, windows
        examples, windows = self._val[seq_len]
        for b, start in enumerate(range(0, len(windows), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield collate(examples, windows[start : start + batch_size], seq_len, self.pad_id, self.packing)


def _token_counts(examples: list[Example]) -> dict[str, int]:
    return {
        "conversations": len(examples),
        "tokens": sum(len(e.x) + 1 for e in examples),
        "answer_tokens": sum(e.answer_tokens for e in examples),
        "answer_bytes": sum(e.answer_bytes for e in examples),
    }


def fit_to_window(examples: list[Example], seq_len: int, split: str) -> list[Example]:
    """Conversations longer than the window keep their first `seq_len` positions (a warning counts them);
    one whose answers all lie beyond is dropped (counted too)."""
    out, cut, dropped = [], [], []
    for e in examples:
        if len(e.x) > seq_len:
            e = Example(e.x[:seq_len], e.y[:seq_len], e.answer_bytes, e.source)
            (cut if e.answer_tokens else dropped).append(e.source)
            if not e.answer_tokens:
                continue
        out.append(e)
    if cut or dropped:
        log.warning(
            "%s: %d conversation(s) longer than the %d-token window were cut to it (e.g. %s)%s; raise "
            "--train.seq_len to keep them whole",
            split, len(cut) + len(dropped), seq_len, (cut + dropped)[0],
            f", {len(dropped)} of them dropped (no answer left)" if dropped else "",
        )  # fmt: skip
    if not out:
        raise DataError(f"the {split} split has no conversation with an answer inside {seq_len} tokens")
    return out


def pack(examples: list[Example], seq_len: int, order: np.ndarray | None = None) -> list[list[int]]:
    """Windows of conversation indices, each holding at most `seq_len` positions: best fit in `order` (each
    conversation goes to the open window it fills most tightly), so windows end nearly full."""
    by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]  # room left -> windows with that room
    windows: list[list[int]] = []
    for i in order if order is not None else range(len(examples)):
        n = len(examples[i].x)
        room = next((r for r in range(n, seq_len + 1) if by_room[r]), None)
        if room is None:
            windows.append([])
            w, room = len(windows) - 1, seq_len
        else:
            w = by_room[room].pop()
        windows[w].append(int(i))
        by_room[room - n].append(w)
    return windows


def collate(
    examples: list[Example], windows: list[list[int]], seq_len: int, pad_id: int, packing: bool
) -> tuple:
    """Rows of `windows` → (x (B, T), y (B, T)), plus {"doc_ids": (B, T)} when packed. Padded targets are
    IGNORE_INDEX; padding gets a segment of its own, so no real token attends to it. Padded rows (one
    conversation each) are as long as the batch's longest."""
    T = seq_len if packing else max(len(examples[i].x) for w in windows for i in w)
    x = np.full((len(windows), T), pad_id, dtype=np.int64)
    y = np.full((len(windows), T), IGNORE_INDEX, dtype=np.int64)
    doc = np.zeros((len(windows), T), dtype=np.int64)
    for b, window in enumerate(windows):
        at = 0
        for k, i in enumerate(window):
            e = examples[i]
            x[b, at : at + len(e.x)], y[b, at : at + len(e.x)], doc[b, at : at + len(e.x)] = e.x, e.y, k
            at += len(e.x)
        doc[b, at:] = len(window)
    x_BT, y_BT = torch.from_numpy(x), torch.from_numpy(y)
    return (x_BT, y_BT, {"doc_ids": torch.from_numpy(doc)}) if packing else (x_BT, y_BT)


class ChatLoader:
    """Endless, resumable batches of conversations, in the order contract of `TokenLoader`: fixed windows
    (packed once, from a seeded shuffle; or one conversation each), visited in a new seeded permutation each
    epoch, rank r of W taking every W-th; `state_dict()` after k batches continues with batch k + 1."""

    def __init__(
        self, examples: list[Example], seq_len: int, batch_size: int, pad_id: int, *,
        seed: int = 0, rank: int = 0, world_size: int = 1, packing: bool = True,
    ) -> None:  # fmt: skip
        self.examples = fit_to_window(examples, seq_len, "train")
        self.seq_len, self.batch_size, self.pad_id, self.packing = seq_len, batch_size, pad_id, packing
        self.seed, self.rank, self.world_size = seed, rank, world_size
        if packing:
            order = np.random.default_rng([seed, 1 << 20]).permutation(len(self.examples))
            self.windows = pack(self.examples, seq_len, order)
        else:
            self.windows = [[i] for i in range(len(self.examples))]
        self.batches_per_epoch = len(self.windows) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"too few conversations: {len(self.examples)} make {len(self.windows)} row(s), fewer than one "
                f"batch of {batch_size} x {world_size} rank(s); use more data or a smaller --train.micro_batch_size"
            )
        self.epoch, self._batch = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __iter__(self) -> ChatLoader:
        return self

    def __next__(self) -> tuple:
        if self._order_epoch != self.epoch:
            used = self.batches_per_epoch * self.batch_size * self.world_size
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.windows))
            self._order_epoch, self._order = self.epoch, order[self.rank : used : self.world_size]
        B = self.batch_size
        rows = [self.windows[w] for w in self._order[self._batch * B : (self._batch + 1) * B].tolist()]
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self.epoch, self._batch = self.epoch + 1, 0
        return collate(self.examples, rows, self.seq_len, self.pad_id, self.packing)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "seed": self.seed,
            "packing": self.packing,
            "seq_len": self.seq_len,
            "global_batch_size": self.batch_size * self.world_size,
            "conversations": len(self.examples),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [
            k
            for k in ("seed", "packing", "seq_len", "global_batch_size", "conversations")
            if state.get(k) != mine[k]
        ]
        if changed:
            diffs = ", ".join(f"{k} {state.get(k)} -> {mine[k]}" for k in changed)
            raise DataError(
                f"cannot resume the chat loader exactly: {diffs}; resume with the same data and settings"
            )
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])
