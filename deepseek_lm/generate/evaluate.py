"""Loss, perplexity and bits per byte of a model on a prepared split or on text files (`deepseek-lm eval`).

A prepared split is scored exactly as the trainer's evaluation scores it (`deepseek_lm.train.loop.evaluate`):
the same `eval_batches` windows with the run's seq_len and micro-batch, the token-weighted mean of the batch
losses. So `eval` of a checkpoint on its own validation split reproduces the final validation loss of its run.

Bits per byte divide the summed loss by the bytes of UTF-8 text the scored tokens stand for (end-of-text
tokens count as tokens, not bytes; the data pipeline's convention), which makes models with different
tokenizers comparable, and comparable with compressors: the xz and zpaq baselines are the sizes xz -9 and
zpaq -m5 need for the text *given the training text* (data/baselines.py), the bars a model trained on that
text should beat.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepseek_lm.data import baselines
from deepseek_lm.data.baselines import named
from deepseek_lm.errors import UserError
from deepseek_lm.model.loss import IGNORE_INDEX

DEFAULT_SEQ_LEN = 1024  # for a checkpoint with no training config (an imported model); capped by its context
DEFAULT_BATCH_SIZE = 4


@dataclass
class EvalSettings:
    seq_len: int | None = None  # window length; None: the training run's
    batch_size: int | None = None  # windows per forward; None: the training run's micro-batch
    max_batches: int | None = None  # None: every window (the trainer's final evaluation does the same)


@dataclass
class EvalReport:
    checkpoint: str
    data: str  # what was scored, in words
    loss: float  # mean cross-entropy, nats per token
    bits_per_byte: float
    xz_bits_per_byte: float | None  # None when no training text was at hand
    zpaq_bits_per_byte: float | None  # None also without the zpaq command
    note: str | None  # why something is missing or approximate
    tokens: int  # tokens scored
    seq_len: int
    batch_size: int
    perplexity: float = field(init=False)  # exp(loss), derived

    def __post_init__(self) -> None:
        self.perplexity = _perplexity(self.loss)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        bars = ", ".join(f"{name} {value:.3f}" for name, value in named(self.to_dict()).items())
        bars = f"   (given the training text: {bars})" if bars else ""
        lines = [
            f"checkpoint  {self.checkpoint}",
            f"data        {self.data}",
            f"windows     {self.tokens:,} tokens scored, windows of {self.seq_len}, batch {self.batch_size}",
            f"loss        {self.loss:.4f} nats/token",
            f"perplexity  {self.perplexity:.2f}",
            f"bits/byte   {self.bits_per_byte:.4f}{bars}",
        ]
        if self.note:
            lines.append(f"note        {self.note}")
        return "\n".join(lines)


@torch.inference_mode()
def mean_loss(model: torch.nn.Module, batches: Iterable[tuple]) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over (x, y) or (x, y, {model inputs}) batches, and the number of
    tokens scored (targets other than -100: conversations score their answers only)."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for x, y, *inputs in batches:
        extra = {k: v.to(device) for k, v in inputs[0].items()} if inputs else {}
        out = model(x.to(device), targets=y.to(device), **extra)
        n = int((y != IGNORE_INDEX).sum())
        total += out.loss.item() * n
        count += n
    return total / max(count, 1), count


def evaluate_tokens(
    model: torch.nn.Module, tokens: np.ndarray, bytes_per_token: float, seq_len: int, batch_size: int,
    max_batches: int | None = None,
) -> tuple[float, float, int]:  # fmt: skip
    """(loss, bits per byte, tokens scored) over the deterministic windows of a token array."""
    from deepseek_lm.data import eval_batches
    from deepseek_lm.data.preparation import bits_per_byte

    if seq_len > model.config.max_position_embeddings:
        raise UserError(
            f"--seq-len {seq_len} exceeds the model's context ({model.config.max_position_embeddings})"
        )
    loss, count = mean_loss(model, eval_batches(tokens, seq_len, batch_size, max_batches))
    return loss, bits_per_byte(loss, count, count * bytes_per_token), count


def evaluate_checkpoint(
    ckpt: Any,
    *,
    data: list[str] | None = None,
    data_dir: str | None = None,
    settings: EvalSettings | None = None,
) -> EvalReport:
    """Score a loaded `Checkpoint` on text files (`data`), a prepared directory's validation split
    (`data_dir`), or, with neither, the validation split of the data it was trained on."""
    settings = settings or EvalSettings()
    train = ckpt.train_config or {}
    ctx = ckpt.config.max_position_embeddings
    seq_len = settings.seq_len or train.get("seq_len") or min(DEFAULT_SEQ_LEN, ctx)
    batch_size = settings.batch_size or train.get("micro_batch_size") or DEFAULT_BATCH_SIZE
    if seq_len <= 0 or batch_size <= 0:
        raise UserError(f"--seq-len and --batch-size must be > 0 (got {seq_len}, {batch_size})")
    if data:
        return _evaluate_files(ckpt, data, seq_len, batch_size, settings.max_batches)
    data_dir = _data_dir(ckpt, data_dir)
    from deepseek_lm.data.chat_data import is_chat_dir

    if is_chat_dir(data_dir):  # conversations packed apart: any window holds them, so the context's
        seq_len = settings.seq_len or min(DEFAULT_SEQ_LEN, ctx)
        return _evaluate_chat(ckpt, data_dir, seq_len, batch_size, settings.max_batches)
    return _evaluate_split(ckpt, data_dir, seq_len, batch_size, settings.max_batches)


def _data_dir(ckpt: Any, data_dir: str | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    if ckpt.train_config is None:
        raise UserError(
            f"{ckpt.path} records no training data (no training config): pass --data FILES or --data-dir DIR"
        )
    if ckpt.train_config.get("data_dir"):
        return Path(ckpt.train_config["data_dir"])
    from deepseek_lm.data import default_data_dir

    return default_data_dir()  # the trainer's default: the built-in corpus


def _evaluate_split(
    ckpt: Any, data_dir: Path, seq_len: int, batch_size: int, max_batches: int | None
) -> EvalReport:
    from deepseek_lm.data import PreparedData

    data = PreparedData.open(data_dir)
    _check_same_tokenizer(ckpt, data)
    loss, bpb, count = evaluate_tokens(
        ckpt.model, data.tokens("val"), data.bytes_per_token("val"), seq_len, batch_size, max_batches
    )
    note = "a subset of the split (--max-batches)" if max_batches is not None else None
    return EvalReport(
        checkpoint=str(ckpt.path),
        data=f"validation split of {data_dir}",
        loss=loss,
        bits_per_byte=bpb,
        xz_bits_per_byte=data.manifest.get("xz_bits_per_byte"),
        zpaq_bits_per_byte=data.manifest.get("zpaq_bits_per_byte"),
        note=note,
        tokens=count,
        seq_len=seq_len,
        batch_size=batch_size,
    )


def _evaluate_chat(
    ckpt: Any, data_dir: Path, seq_len: int, batch_size: int, max_batches: int | None
) -> EvalReport:
    """The held-out answers of a chat directory under the checkpoint's chat format: the loss of the
    assistant's tokens only, bits per byte of the answers' text."""
    from deepseek_lm.data.chat_data import ChatData, ChatDir
    from deepseek_lm.data.preparation import bits_per_byte

    if ckpt.tokenizer is None:
        raise UserError(f"{ckpt.path} has no tokenizer.json to render the conversations with")
    if seq_len > ckpt.config.max_position_embeddings:
        raise UserError(
            f"--seq-len {seq_len} exceeds the model's context ({ckpt.config.max_position_embeddings})"
        )
    data = ChatData(ChatDir.open(data_dir), ckpt.tokenizer, ckpt.chat_template)
    loss, count = mean_loss(ckpt.model, data.val_batches(seq_len, batch_size, max_batches))
    bpb = bits_per_byte(loss, count, count * data.bytes_per_token("val"))
    notes = ["answers only (assistant tokens and their end of turn)"]
    if max_batches is not None:
        notes.append("a subset of the split (--max-batches)")
    template = "role tokens" if data.format.stop_token_ids else "plain role lines"
    return EvalReport(
        checkpoint=str(ckpt.path),
        data=f"held-out conversations of {data_dir} ({template})",
        loss=loss,
        bits_per_byte=bpb,
        xz_bits_per_byte=None,
        zpaq_bits_per_byte=None,
        note="; ".join(notes),
        tokens=count,
        seq_len=seq_len,
        batch_size=batch_size,
    )


def _evaluate_files(
    ckpt: Any, specs: list[str], seq_len: int, batch_size: int, max_batches: int | None
) -> EvalReport:
    from deepseek_lm.data import read_documents
    from deepseek_lm.data.sources import resolve_paths

    if ckpt.tokenizer is None:
        raise UserError(
            f"{ckpt.path} has no tokenizer.json to tokenise --data files with: copy its training data's "
            "tokenizer.json (DATA_DIR/tokenizer.json) into it, or evaluate a prepared split with --data-dir"
        )
    paths = resolve_paths(specs)
    docs = [d for d in read_documents(paths) if d]
    if not docs:
        raise UserError(f"--data {' '.join(specs)}: no text in these files")
    tokens = _tokenize(ckpt, docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    loss, bpb, count = evaluate_tokens(
        ckpt.model, tokens, n_bytes / len(tokens), seq_len, batch_size, max_batches
    )
    figures, note = _baselines_given_training_text(ckpt, docs)
    return EvalReport(
        checkpoint=str(ckpt.path),
        data=f"{len(paths)} file(s): {', '.join(p.name for p in paths[:3])}{', ...' if len(paths) > 3 else ''}",
        loss=loss,
        bits_per_byte=bpb,
        **figures,
        note=note,
        tokens=count,
        seq_len=min(seq_len, len(tokens) - 1),
        batch_size=batch_size,
    )


def _tokenize(ckpt: Any, docs: list[str]) -> np.ndarray:
    """Each document followed by the end-of-text token, as `prepare` writes the token files."""
    from deepseek_lm.data import special_token_ids

    eot = special_token_ids(ckpt.tokenizer)["eot"]
    ids = [i for e in ckpt.tokenizer.encode_batch(docs, add_special_tokens=False) for i in (*e.ids, eot)]
    vocab = ckpt.config.vocab_size
    if max(ids) >= vocab:
        raise UserError(
            f"{ckpt.path}: its tokenizer produces id {max(ids)}, beyond the model's vocabulary ({vocab})"
        )
    return np.asarray(ids, dtype=np.int64)


def _baselines_given_training_text(ckpt: Any, docs: list[str]) -> tuple[dict, str | None]:
    """xz and zpaq bits per byte of `docs` given the checkpoint's training text, read back from its prepared
    data: ({"xz_bits_per_byte": ..., "zpaq_bits_per_byte": ...}, why they are missing)."""
    from deepseek_lm.data import DataError, PreparedData

    try:
        data = PreparedData.open(_data_dir(ckpt, None))
    except (DataError, UserError) as e:
        figures = {"xz_bits_per_byte": None, "zpaq_bits_per_byte": None}
        return figures, f"no compressor baselines: the training data is not at hand ({e})"
    train = data.tokens("train")
    # the compressors look back at most 64 MiB (xz's dictionary): decode only the training tail they could use
    tail = int(baselines.XZ_TRAIN / max(data.bytes_per_token("train"), 1e-9))
    train_text = data.tokenizer.decode(np.asarray(train[-tail:]).tolist(), skip_special_tokens=True)
    return baselines.compressor_baselines([train_text], docs), None


def _check_same_tokenizer(ckpt: Any, data: Any) -> None:
    from deepseek_lm.data.tokenizer import tokenizer_hash

    if ckpt.tokenizer is not None and tokenizer_hash(ckpt.tokenizer) != data.manifest.get("tokenizer_hash"):
        raise UserError(
            f"{data.path} was tokenised with a different tokenizer than {ckpt.path}: "
            "evaluate on text files with --data instead"
        )


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # the trainer's cap: a diverged model prints a large number, not inf
