"""Data: corpus sources, the tokenizer, `prepare` (token files + manifest) and the resumable loader.

Importing this package is cheap: the names below resolve lazily, so `datasets`, `pyarrow` and torch load
only when a function that needs them runs.

    from deepseek_lm.data import PreparedData, TokenLoader, load_tokenizer, default_data_dir
    data = PreparedData.open(prepare_builtin(default_data_dir()).path)
    loader = TokenLoader(data.tokens("train"), seq_len=256, batch_size=8, seed=0)
"""

from __future__ import annotations

import importlib

from deepseek_lm.errors import UserError


class DataError(UserError):
    """Missing, empty, malformed or too-short data; the message names the input and what to do."""


# public name -> the submodule that defines it
_EXPORTS = {
    "PreparedData": "preparation",
    "PrepareConfig": "preparation",
    "prepare": "preparation",
    "prepare_builtin": "preparation",
    "default_data_dir": "preparation",
    "bits_per_byte": "preparation",
    "TokenLoader": "loader",
    "eval_batches": "loader",
    "load_tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
    "special_token_ids": "tokenizer",
    "add_missing_eot": "tokenizer",
    "EOT_TOKEN": "tokenizer",
    "PAD_TOKEN": "tokenizer",
    "builtin_documents": "sources",
    "read_documents": "sources",
}
__all__ = ["DataError", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
