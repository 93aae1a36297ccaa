"""The tokenizer: a byte-level BPE trained on the training split, or an existing Hugging Face tokenizer.

Special tokens are declared here and nowhere else. Our own BPE has no BOS: documents are packed, each one
followed by `<|endoftext|>` (GPT-2's convention), which is both the separator and the EOS a sampler stops at.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from deepseek_lm.data import DataError

EOT_TOKEN = "<|endoftext|>"  # document separator and end of sequence; id 0 in our BPE
PAD_TOKEN = "<|pad|>"  # padding for batched generation; never in the token files; id 1 in our BPE
SPECIAL_TOKENS = (EOT_TOKEN, PAD_TOKEN)

# Spellings other tokenizers use, tried in order when a loaded tokenizer lacks ours.
_EOT_ALIASES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
_PAD_ALIASES = (PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
_BOS_ALIASES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens


def train_bpe(texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation, no unknown tokens) trained on `texts`."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """A tokenizer from a tokenizer.json, a directory holding one, or a Hugging Face Hub repository name."""
    path = Path(path_or_name)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path_or_name}: no tokenizer.json in this directory")
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None
    name = str(path_or_name)
    if name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1:
        raise DataError(f"{name}: no such tokenizer file or directory")
    return Tokenizer.from_file(_hub_file(name))


def _hub_file(repo_id: str) -> str:
    """tokenizer.json of a Hub repository: from the local cache when offline, else downloaded."""
    from huggingface_hub import hf_hub_download

    from deepseek_lm.data.sources import hub_unreachable_reason

    reason = hub_unreachable_reason()
    try:
        return hf_hub_download(repo_id, "tokenizer.json", local_files_only=reason is not None)
    except Exception as e:  # not cached, no such repository, no tokenizer.json, a dropped connection
        why = reason or f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise DataError(
            f"--tokenizer {repo_id}: cannot get tokenizer.json from the Hugging Face Hub ({why}); connect to "
            "the network, or give a local tokenizer.json (or a directory holding one)"
        ) from None


def special_token_ids(tok: Tokenizer) -> dict[str, int | None]:
    """{"eot", "pad", "bos"} ids of `tok`, None where it has none; pad falls back to eot. Read-only."""
    eot, pad = _first_id(tok, _EOT_ALIASES), _first_id(tok, _PAD_ALIASES)
    return {"eot": eot, "pad": eot if pad is None else pad, "bos": _first_id(tok, _BOS_ALIASES)}


def add_missing_eot(tok: Tokenizer) -> None:
    """Give a tokenizer without an end-of-text token ours: `prepare` needs a document separator."""
    if _first_id(tok, _EOT_ALIASES) is None:
        tok.add_special_tokens([EOT_TOKEN])


def _first_id(tok: Tokenizer, names: tuple[str, ...]) -> int | None:
    return next((i for i in map(tok.token_to_id, names) if i is not None), None)


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()
