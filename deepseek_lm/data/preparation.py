"""`prepare`: documents -> train/val split -> tokenizer -> token files + manifest, cached, written atomically.

A prepared directory:

    train.bin, val.bin   token ids, raw (dtype in the manifest); every document is followed by <|endoftext|>
    tokenizer.json       for `tokenizers.Tokenizer.from_file` and transformers' `PreTrainedTokenizerFast`
    val.txt              the validation documents, each followed by the end-of-text token's text, so that
                         `tokenizer.encode(val.txt)` gives val.bin back exactly
    manifest.json        what went in and what came out; written last, and the directory is renamed into
                         place only when complete, so a directory with a manifest is a finished one
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deepseek_lm.data import DataError
from deepseek_lm.data import sources as src
from deepseek_lm.data.baselines import compressor_baselines
from deepseek_lm.data.tokenizer import (
    MIN_VOCAB_SIZE,
    add_missing_eot,
    load_tokenizer,
    special_token_ids,
    tokenizer_hash,
    train_bpe,
)

FORMAT, FORMAT_VERSION = "deepseek-lm-data", 1
SPLITS = ("train", "val")
DEFAULT_VOCAB_SIZE = 8192  # a BPE trained on the user's text
# The built-in corpus' BPE: 4,096 rather than 8,192 tokens. At 3.4 MB of training text the 8,192-token head
# is a third of a demo step's FLOPs and its rare tokens are seen a few times each; measured on the seed
# architecture at 1,000 steps the two vocabularies reach the same bits per byte (2.045 / 2.041), and a step
# at 4,096 takes 0.82 of the time (benchmarks/learning/README.md).
BUILTIN_VOCAB_SIZE = 4096
MIN_TRAIN_WINDOWS = 2  # the training split must hold this many windows of seq_len + 1 tokens


@dataclass
class PrepareConfig:
    """What to prepare. Each field is a `deepseek-lm prepare` flag (`vocab_size` -> `--vocab-size`).

    Attributes:
        out: Output directory (default for the built-in corpus: data_cache/builtin).
        data: Files (.txt, .md, .jsonl, .parquet), directories and globs; without it and --dataset: the built-in corpus.
        dataset: A Hugging Face dataset name (streamed) or a local dataset directory.
        dataset_config: The dataset's configuration (subset) name.
        dataset_split: The dataset's split to read.
        max_documents: Read at most this many documents from --dataset.
        text_field: The text field of .jsonl lines, .parquet columns and dataset rows.
        tokenizer: A tokenizer.json, a directory holding one, or a Hub name. Default: train a byte-level BPE.
        vocab_size: Vocabulary of the trained BPE (default 8192; 4096 for the built-in corpus).
        val_fraction: Fraction of the documents held out for validation (at least one each side).
        split_seed: Seed of the train/validation split.
        seq_len: The check "corpus too short": the training split must hold 2 windows of seq_len + 1 tokens.
        xz_baseline: Compute the xz bits per byte of the validation text given the training text.
        zpaq_baseline: The same under zpaq -m5, when the zpaq command is present (~12 s per 3.4 MB of text).
        force: Prepare again even when a finished cache with the same inputs exists.
    """

    out: str | None = None
    data: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    max_documents: int | None = None
    text_field: str = "text"
    tokenizer: str | None = None
    vocab_size: int | None = None
    val_fraction: float = 0.05
    split_seed: int = 0
    seq_len: int = 256
    xz_baseline: bool = True
    zpaq_baseline: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        if self.data and self.dataset:
            raise DataError("give --data or --dataset, not both")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"--val-fraction {self.val_fraction}: must lie strictly between 0 and 1")
        if self.tokenizer and self.vocab_size:
            raise DataError("--vocab-size sets the size of a trained BPE; with --tokenizer, drop it")
        if self.vocab_size is not None and self.vocab_size < MIN_VOCAB_SIZE:
            raise DataError(
                f"--vocab-size {self.vocab_size}: a byte-level BPE needs at least {MIN_VOCAB_SIZE}"
            )
        if self.seq_len < 1 or (self.max_documents is not None and self.max_documents < 1):
            raise DataError("--seq-len and --max-documents must be positive")


def _damaged(path: Path, manifest: object, problem: str) -> DataError:
    """A damaged prepared directory: the fix is the prepare command that made it, forced."""
    source = manifest.get("source") if isinstance(manifest, dict) else None
    inputs = f"its inputs ({source})" if source else "its inputs"
    return DataError(f"{problem}; rebuild it: `deepseek-lm prepare` with {inputs} and `--out {path} --force`")


@dataclass
class PreparedData:
    """A finished prepared directory. `PreparedData.open(dir)`; `reused` says the cache was hit."""

    path: Path
    manifest: dict
    reused: bool = field(default=False, compare=False)

    @classmethod
    def open(cls, path: str | Path) -> PreparedData:
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise DataError(
                f"{path}: not a prepared data directory (no manifest.json); make one with "
                f"`deepseek-lm prepare [--data FILES] --out {path}`"
            ) from None
        except (ValueError, OSError) as e:
            raise _damaged(path, None, f"{path / 'manifest.json'}: unreadable ({e})") from None
        if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (
            FORMAT,
            FORMAT_VERSION,
        ):
            raise _damaged(path, manifest, f"{path}: not a {FORMAT} v{FORMAT_VERSION} directory")
        try:
            sizes = {
                s: manifest["splits"][s]["tokens"] * np.dtype(manifest["dtype"]).itemsize for s in SPLITS
            }
        except (KeyError, TypeError) as e:
            raise _damaged(path, manifest, f"{path / 'manifest.json'}: incomplete (no {e})") from None
        for split, size in sizes.items():
            file = path / f"{split}.bin"
            if not file.is_file() or file.stat().st_size != size:
                raise _damaged(path, manifest, f"{file}: missing or truncated")
        if not (path / "tokenizer.json").is_file():
            raise _damaged(path, manifest, f"{path / 'tokenizer.json'}: missing")
        return cls(path, manifest)

    def tokens(self, split: str) -> np.memmap:
        """The split's token ids, memory-mapped read-only: (N,) uint16 or uint32."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return np.memmap(self.path / f"{split}.bin", dtype=self.manifest["dtype"], mode="r")

    @functools.cached_property
    def tokenizer(self):  # -> tokenizers.Tokenizer
        return load_tokenizer(self.path / "tokenizer.json")

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token (end-of-text tokens count as tokens, not bytes)."""
        s = self.manifest["splits"][split]
        return s["bytes"] / s["tokens"]

    # what the trainer reads (its data source; fine-tuning's is data/chat_data.ChatData)
    chat_template = None  # plain text: no chat template to store with checkpoints

    def train_loader(self, seq_len: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        from deepseek_lm.data.loader import TokenLoader

        return TokenLoader(
            self.tokens("train"), seq_len, batch_size, seed=seed, rank=rank, world_size=world_size
        )

    def val_batches(self, seq_len: int, batch_size: int, max_batches: int | None = None):
        from deepseek_lm.data.loader import eval_batches

        return eval_batches(self.tokens("val"), seq_len, batch_size, max_batches)


def bits_per_byte(loss_nats_per_token: float, tokens: int, n_bytes: int) -> float:
    """Mean cross-entropy (nats/token) over `tokens` tokens -> bits per byte of the `n_bytes` they encode.

    Comparable across tokenizers and with `xz_bits_per_byte`; for a whole split, `n_bytes / tokens` is
    `PreparedData.bytes_per_token(split)`.
    """
    return loss_nats_per_token * tokens / (math.log(2) * n_bytes)


def default_data_dir() -> Path:
    """Where the built-in corpus is prepared by default: ./data_cache/builtin."""
    return Path.cwd() / "data_cache" / "builtin"


def prepare_builtin(
    out_dir: str | Path | None = None,
    *,
    vocab_size: int = BUILTIN_VOCAB_SIZE,
    xz_baseline: bool = True,
    zpaq_baseline: bool = True,
) -> PreparedData:
    """The built-in corpus, prepared (or reused) in `out_dir` (default: `default_data_dir()`)."""
    out = str(out_dir) if out_dir is not None else None
    return prepare(
        PrepareConfig(out=out, vocab_size=vocab_size, xz_baseline=xz_baseline, zpaq_baseline=zpaq_baseline)
    )


def prepare(cfg: PrepareConfig) -> PreparedData:
    """Read, split, tokenise and write `cfg`'s data; reuse the output directory when its inputs match."""
    start = time.perf_counter()
    out = _out_dir(cfg)
    source, inputs, read = _source(cfg, out)
    key = _cache_key(cfg, inputs)
    cached = None if cfg.force else _cached(out, key)
    if cached:
        return cached
    _check_replaceable(out)

    train_docs, val_docs, split_how = split_documents(read(), cfg.val_fraction, cfg.split_seed)
    # the built-in corpus: its test suites' prose trains too, validation stays the library's modules
    training_only = [] if cfg.data or cfg.dataset else src.builtin_training_documents()
    train_docs += training_only
    tok = _tokenizer(cfg, train_docs)
    add_missing_eot(tok)
    ids = special_token_ids(tok)
    with _staging(out) as tmp:
        splits, dtype = _write_splits(tmp, tok, ids["eot"], train_docs, val_docs)
        _check_long_enough(source, splits["train"]["tokens"], cfg.seq_len)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source": source,
            "inputs": inputs,
            "cache_key": key,
            "tokenizer": cfg.tokenizer or "byte-level BPE trained on the training split",
            "tokenizer_hash": tokenizer_hash(tok),
            "vocab_size": tok.get_vocab_size(),
            "dtype": dtype,
            "eot_token_id": ids["eot"],
            "pad_token_id": ids["pad"],
            "bos_token_id": ids["bos"],
            "split": split_how,
            "training_only_documents": len(training_only),
            "split_seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction,
            "splits": splits,
            **compressor_baselines(train_docs, val_docs, xz=cfg.xz_baseline, zpaq=cfg.zpaq_baseline),
            "prepare_seconds": round(time.perf_counter() - start, 2),
            "python": sys.version.split()[0],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return PreparedData.open(out)


def _cached(out: Path, key: str) -> PreparedData | None:
    try:
        data = PreparedData.open(out)
    except DataError:  # absent, unfinished or foreign: prepare afresh
        return None
    return (
        PreparedData(data.path, data.manifest, reused=True) if data.manifest.get("cache_key") == key else None
    )


def _write_splits(tmp: Path, tok, eot: int, train_docs: list[str], val_docs: list[str]) -> tuple[dict, str]:
    """train.bin, val.bin, tokenizer.json and val.txt; returns the per-split counts and the token dtype."""
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    splits = {
        name: _write_tokens(tok, docs, tmp / f"{name}.bin", dtype, eot, name)
        for name, docs in (("train", train_docs), ("val", val_docs))
    }
    tok.save(str(tmp / "tokenizer.json"))
    eot_text = tok.id_to_token(eot)
    (tmp / "val.txt").write_text("".join(d + eot_text for d in val_docs), encoding="utf-8")
    return splits, np.dtype(dtype).name


def _out_dir(cfg: PrepareConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.data or cfg.dataset:
        raise DataError("--out DIR is required with --data or --dataset")
    return default_data_dir()


def _source(cfg: PrepareConfig, out: Path) -> tuple[str, dict, Callable[[], list[str]]]:
    """(description, fingerprint of the inputs, reader). The fingerprint is cheap: no text is read."""
    if cfg.data:
        return _files_source(cfg, out)
    if cfg.dataset:
        return _dataset_source(cfg)
    source = (
        f"builtin: Python {sys.version.split()[0]} standard-library docstrings and comments "
        "(its test suites' in training only)"
    )
    return source, src.builtin_fingerprint(), src.builtin_documents


def _files_source(cfg: PrepareConfig, out: Path) -> tuple[str, dict, Callable[[], list[str]]]:
    # `--data corpus --out corpus/prepared` must not read its own val.txt back on the next run
    paths = [p for p in src.resolve_paths(cfg.data) if out.resolve() not in p.parents]
    if not paths:
        raise DataError(f"{' '.join(cfg.data)}: no data files outside --out {out}")
    names = ", ".join(p.name for p in paths[:5]) + (f", ... ({len(paths)} files)" if len(paths) > 5 else "")
    inputs = {"files": src.files_fingerprint(paths), "text_field": cfg.text_field}
    return f"files: {names}", inputs, lambda: src.read_documents(paths, cfg.text_field)


def _dataset_source(cfg: PrepareConfig) -> tuple[str, dict, Callable[[], list[str]]]:
    keys = ("dataset", "dataset_config", "dataset_split", "max_documents", "text_field")
    inputs = {k: getattr(cfg, k) for k in keys}
    if Path(cfg.dataset).is_dir():  # a local dataset: its files' sizes and times, as for --data
        inputs["files"] = src.files_fingerprint(
            sorted(p for p in Path(cfg.dataset).rglob("*") if p.is_file())
        )
    read = functools.partial(
        src.dataset_documents,
        cfg.dataset,
        config=cfg.dataset_config,
        split=cfg.dataset_split,
        text_field=cfg.text_field,
        max_documents=cfg.max_documents,
    )
    return f"hf: {cfg.dataset}", inputs, read


def _cache_key(cfg: PrepareConfig, inputs: dict) -> str:
    tokenizer = cfg.tokenizer
    if tokenizer and Path(tokenizer).exists():  # a local tokenizer: its content, not its name
        file = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
        tokenizer = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else tokenizer
    settings = {
        k: v for k, v in asdict(cfg).items() if k not in ("out", "data", "force", "seq_len", "tokenizer")
    }
    settings["vocab_size"] = cfg.vocab_size or (None if cfg.tokenizer else default_vocab_size(cfg))
    blob = json.dumps([FORMAT_VERSION, inputs, tokenizer, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str], str]:
    """Seeded split by document, source order kept on each side, at least one document on each.

    A corpus of one document (one .txt file) is split by position instead, at a line start: its last
    `val_fraction` is the validation text, as nanoGPT does.
    """
    if len(docs) == 1:
        return *_split_one(docs[0], val_fraction), "by position (one document)"
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val = set(np.random.default_rng(seed).permutation(len(docs))[:n_val].tolist())
    train_docs = [d for i, d in enumerate(docs) if i not in val]
    return train_docs, [d for i, d in enumerate(docs) if i in val], "by document"


def _split_one(text: str, val_fraction: float) -> tuple[list[str], list[str]]:
    if len(text) < 2:
        raise DataError("the corpus is too short: one document of fewer than 2 characters")
    at = round(len(text) * (1 - val_fraction))
    after = text.find("\n", at, len(text) - 1)  # the next line start that leaves some validation text
    before = text.rfind("\n", 0, at)
    at = after + 1 if after != -1 else before + 1 if before != -1 else at
    at = min(max(at, 1), len(text) - 1)
    return [text[:at]], [text[at:]]


def _tokenizer(cfg: PrepareConfig, train_docs: list[str]):
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    vocab_size = cfg.vocab_size or default_vocab_size(cfg)
    return train_bpe(train_docs, vocab_size, progress=sys.stderr.isatty())


def default_vocab_size(cfg: PrepareConfig) -> int:
    return DEFAULT_VOCAB_SIZE if cfg.data or cfg.dataset else BUILTIN_VOCAB_SIZE


def _write_tokens(tok, docs: list[str], file: Path, dtype, eot: int, name: str, batch: int = 256) -> dict:
    """Encode `docs` in batches (parallel inside `tokenizers`), each followed by `eot`, appending to `file`."""
    from tqdm import tqdm

    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (no offsets) since tokenizers 0.21
    n_bytes = [len(d.encode()) for d in docs]
    eot_1 = np.array([eot], dtype)  # (1,)
    tokens = 0
    with (
        open(file, "wb") as f,
        tqdm(
            total=sum(n_bytes),
            unit="B",
            unit_scale=True,
            desc=f"encoding {name}",
            file=sys.stderr,
            disable=None,
        ) as bar,
    ):
        for i in range(0, len(docs), batch):
            encodings = encode(docs[i : i + batch], add_special_tokens=False)
            ids = np.concatenate([a for e in encodings for a in (np.asarray(e.ids, dtype), eot_1)])
            ids.tofile(f)
            tokens += len(ids)
            bar.update(sum(n_bytes[i : i + batch]))
    return {"documents": len(docs), "bytes": sum(n_bytes), "tokens": tokens}


def _check_long_enough(source: str, train_tokens: int, seq_len: int) -> None:
    need = MIN_TRAIN_WINDOWS * (seq_len + 1)
    if train_tokens < need:
        raise DataError(
            f"{source}: the corpus is too short: {train_tokens} training tokens, fewer than {need} "
            f"({MIN_TRAIN_WINDOWS} windows of --seq-len {seq_len} + 1); add text or lower --seq-len"
        )


def _check_replaceable(out: Path) -> None:
    """Only a prepared directory (or an empty one) may be replaced: never a directory of the user's files."""
    if out.exists() and not (out.is_dir() and ((out / "manifest.json").is_file() or not any(out.iterdir()))):
        raise DataError(
            f"--out {out}: exists and is not a prepared data directory; choose a new or empty one"
        )


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh sibling directory to write into, renamed to `out` only when the block completes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
