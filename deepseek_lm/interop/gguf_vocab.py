"""A `tokenizers.Tokenizer` ↔ the vocabulary llama.cpp reads from a GGUF file (`tokenizer.ggml.*`), both ways.

llama.cpp's byte-level BPE (`tokenizer.ggml.model = "gpt2"`) holds the tokens in id order (with a type each),
the merges in rank order and, by name, one of a fixed set of pre-tokenizers (`tokenizer.ggml.pre`): the
regular expressions that split text into words before the merges run. llama.cpp's converter picks that name
by hashing the tokenizer's output on a probe text, so it refuses tokenizers it has not seen; here the name
comes from what the tokenizer.json says it does, from a table of the splits llama.cpp implements:
- `gpt-2`: GPT-2's pattern, what `tokenizers`' ByteLevel pre-tokenizer applies; our own BPE (`prepare`).
- `smollm`: digits one by one, then GPT-2's pattern (`Digits(individual_digits)` + ByteLevel): the SmolLM /
  StarCoder tokenizers, the seed's 49,152-token vocabulary among them.
The tests check that llama.cpp then splits and merges strings chosen to break tokenizers exactly as ours.

Token types: `special` added tokens are CONTROL (llama.cpp parses them out of text only when asked to, as
chat templates need, and never prints them), other added tokens USER_DEFINED (always parsed), the rest
NORMAL; ids past the tokenizer's up to the model's padded vocabulary are UNUSED placeholders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFValueType, Keys, TokenType

from deepseek_lm.interop.hf_config import InteropError

# llama.cpp's pre-tokenizer name -> the tokenizer.json pre-tokenizer steps that split text the same way
PRE_TOKENIZERS: dict[str, tuple[tuple, ...]] = {
    "gpt-2": (("ByteLevel", False, True),),  # (type, add_prefix_space, use_regex)
    "smollm": (("Digits", True), ("ByteLevel", False, True)),  # (type, individual_digits)
}
UNUSED_TOKEN = "<|unused_{}|>"  # placeholders for the ids the model has and the tokenizer does not
STRING, U32, BOOL = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.BOOL
ARRAY = GGUFValueType.ARRAY


@dataclass
class SpecialIds:
    eos: int | None = None  # end of text: llama.cpp stops there
    pad: int | None = None
    bos: int | None = None
    eot: int | None = None  # end of turn (a chat model's <|end|>): llama.cpp stops there too


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: SpecialIds = field(default_factory=SpecialIds)

    def metadata(self) -> list[tuple[str, Any, GGUFValueType]]:
        s, T = self.special, Keys.Tokenizer
        meta = [
            (T.MODEL, "gpt2", STRING), (T.PRE, self.pre, STRING), (T.LIST, self.tokens, ARRAY),
            (T.TOKEN_TYPE, self.types, ARRAY), (T.MERGES, self.merges, ARRAY),
            # deepseek-lm encodes every text without a post-processor's bos/eos (prepare, generate, chat):
            # the model never saw them, so llama.cpp adds none either
            (T.ADD_BOS, False, BOOL), (T.ADD_EOS, False, BOOL),
        ]  # fmt: skip
        ids = {T.EOS_ID: s.eos, T.PAD_ID: s.pad, T.BOS_ID: s.bos, T.EOT_ID: s.eot}
        return meta + [(k, v, U32) for k, v in ids.items() if v is not None]


# ---------------------------------------------------------------------------------------------------------
# export


def vocab_for_export(tokenizer: Any, vocab_size: int, special: SpecialIds) -> GGUFVocab:
    """The GGUF vocabulary of `tokenizer` for a model of `vocab_size` rows, or an `InteropError` naming what
    llama.cpp cannot represent."""
    spec = json.loads(tokenizer.to_str())
    pre = _pre_tokenizer_name(spec)
    _check_bpe(spec)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token in added.values():
        if token["lstrip"] or token["rstrip"] or token["single_word"]:
            raise InteropError(
                f"the tokenizer's added token {token['content']!r} strips spaces or matches whole words only "
                "(lstrip/rstrip/single_word): llama.cpp's BPE vocabulary has no such rule"
            )
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise InteropError(f"the tokenizer has {size} tokens, more than the model's {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        text = tokenizer.id_to_token(i) if i < size else None
        tokens.append(text if text is not None else UNUSED_TOKEN.format(i))
        types.append(_token_type(text, added.get(i)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return GGUFVocab(tokens, types, merges, pre, special)


def _token_type(text: str | None, added: dict[str, Any] | None) -> int:
    if text is None:
        return TokenType.UNUSED
    if added is None:
        return TokenType.NORMAL
    return TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED


def _steps(pre_tokenizer: dict[str, Any] | None) -> tuple[tuple, ...]:
    """A tokenizer.json pre-tokenizer as the steps PRE_TOKENIZERS lists (offset trimming left out: it
    changes no token)."""
    if pre_tokenizer is None:
        return ()
    kind = pre_tokenizer["type"]
    if kind == "Sequence":
        return tuple(step for p in pre_tokenizer["pretokenizers"] for step in _steps(p))
    if kind == "ByteLevel":
        return ((kind, pre_tokenizer["add_prefix_space"], pre_tokenizer.get("use_regex", True)),)
    if kind == "Digits":
        return ((kind, pre_tokenizer["individual_digits"]),)
    return ((kind,),)


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    steps = _steps(spec.get("pre_tokenizer"))
    name = next((n for n, s in PRE_TOKENIZERS.items() if s == steps), None)
    if name is None:
        raise InteropError(
            f"the tokenizer's pre-tokenizer ({' + '.join(s[0] for s in steps) or 'none'}) splits text in a way "
            f"deepseek-lm cannot name to llama.cpp (it exports byte-level BPE tokenizers that split as GPT-2 "
            f"or as SmolLM/StarCoder: {', '.join(PRE_TOKENIZERS)})"
        )
    if spec.get("normalizer") is not None:
        raise InteropError(
            f"the tokenizer normalises text first ({spec['normalizer']['type']}): llama.cpp's BPE does not"
        )
    return name


def _check_bpe(spec: dict[str, Any]) -> None:
    model, decoder = spec["model"], spec.get("decoder") or {}
    unsupported = {
        "model": None if model["type"] == "BPE" else model["type"],
        "byte_fallback": model.get("byte_fallback") or None,
        "continuing_subword_prefix": model.get("continuing_subword_prefix") or None,
        "end_of_word_suffix": model.get("end_of_word_suffix") or None,
        "ignore_merges": model.get("ignore_merges") or None,
        "dropout": model.get("dropout") or None,
        "decoder": None if decoder.get("type") == "ByteLevel" else decoder.get("type"),
    }
    for what, value in unsupported.items():
        if value is not None:
            raise InteropError(
                f"the tokenizer's {what} is {value!r}: llama.cpp reads byte-level BPE tokenizers "
                "(ByteLevel decoder, no byte fallback, no dropout, merges applied in rank order)"
            )


# ---------------------------------------------------------------------------------------------------------
# import


def tokenizer_from_metadata(meta: dict[str, Any], source: str) -> tuple[Any, list[str]]:
    """The `tokenizers.Tokenizer` a GGUF's vocabulary describes, or None with a note saying why not."""
    T = Keys.Tokenizer
    model, pre = meta.get(T.MODEL), meta.get(T.PRE, "default")
    if model != "gpt2" or pre not in PRE_TOKENIZERS:
        return None, [
            f"{source}: its tokenizer (tokenizer.ggml.model {model!r}, pre {pre!r}) is not imported: deepseek-lm "
            f"reads byte-level BPE ('gpt2') with the {' or '.join(PRE_TOKENIZERS)} pre-tokenizer; the "
            "checkpoint has no tokenizer (give `prepare --tokenizer` the model's tokenizer.json)"
        ]
    tokens, types = list(meta[T.LIST]), list(meta.get(T.TOKEN_TYPE, [TokenType.NORMAL] * len(meta[T.LIST])))
    return _build_tokenizer(tokens, types, list(meta.get(T.MERGES, [])), pre), []


def _build_tokenizer(tokens: list[str], types: list[int], merges: list[str], pre: str) -> Any:
    """BPE over the tokens up to the last NORMAL one (added tokens among them keep their ids, as a trained
    BPE's special tokens do), then the CONTROL / USER_DEFINED tokens after it, added in id order; the UNUSED
    placeholders at the end are dropped."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    core = max(i for i, t in enumerate(types) if t == TokenType.NORMAL) + 1
    vocab = {text: i for i, text in enumerate(tokens[:core])}
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED):
            if i >= core and tok.get_vocab_size() != i:
                break  # a gap of placeholders: the tokens after it would get other ids
            added = AddedToken(text, special=kind == TokenType.CONTROL, normalized=False)
            (tok.add_special_tokens if kind == TokenType.CONTROL else tok.add_tokens)([added])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only, as prepare's BPE
    return tok


def _pre_tokenizer(name: str) -> Any:
    from tokenizers import pre_tokenizers

    steps = [
        pre_tokenizers.ByteLevel(add_prefix_space=False)
        if s[0] == "ByteLevel"
        else pre_tokenizers.Digits(True)
        for s in PRE_TOKENIZERS[name]
    ]
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
