"""What every format's export and import share: the report, the special ids a model generates with, and the
rule that an output never replaces the input or a directory that is not an earlier output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.interop.hf_config import InteropError


@dataclass
class InteropReport:
    path: Path  # the directory or file written
    model_type: str  # deepseek_v3 | deepseek_v2 | deepseek2 (export: written; import: read)
    notes: list[str] = field(default_factory=list)  # things the user should know, one line each


def with_special_ids(config: DeepSeekConfig, tokenizer: Any) -> DeepSeekConfig:
    """The config with the special ids our generation uses: the config's own, else the tokenizer's
    (exactly as `deepseek_lm.generate.Engine` picks them), so other engines stop and pad the same way."""
    if tokenizer is None or (config.eos_token_id is not None and config.pad_token_id is not None):
        return config
    from deepseek_lm.data.tokenizer import special_token_ids

    special = special_token_ids(tokenizer)
    eos = config.eos_token_id if config.eos_token_id is not None else special["eot"]
    pad = config.pad_token_id if config.pad_token_id is not None else special["pad"]
    return DeepSeekConfig.from_dict({**config.to_dict(), "eos_token_id": eos, "pad_token_id": pad})


def end_of_turn_ids(tokenizer: Any, chat_template: str | None) -> tuple[int, ...]:
    """The tokens that end a reply under the checkpoint's chat format (none under the plain one)."""
    if tokenizer is None:
        return ()
    from deepseek_lm.data.chat import ChatFormat

    return ChatFormat.for_tokenizer(tokenizer, chat_template).stop_token_ids


def refuse_overwrite(out: Path, source: Path, looks_ours: Callable[[Path], bool]) -> None:
    """Never replace the input, nor a non-empty directory that is not an earlier output of the same kind."""
    if out.resolve() == source.resolve():
        raise InteropError(f"--out {out} is the input directory; choose another")
    if out.is_dir() and any(out.iterdir()) and not looks_ours(out):
        raise InteropError(f"--out {out} exists and is not empty; choose a new directory")
    if out.exists() and not out.is_dir():
        raise InteropError(f"--out {out} exists and is not a directory")
