import time

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from deepseek_lm.data import DataError
from deepseek_lm.data.tokenizer import (
    EOT_TOKEN,
    PAD_TOKEN,
    add_missing_eot,
    load_tokenizer,
    special_token_ids,
    tokenizer_hash,
    train_bpe,
)

TEXTS = [
    "Return the number of items in a container.\n\n    >>> len([1, 2, 3])\n    3\n",
    "Encode the string using the codec registered for encoding; errors may be given to set a different "
    "error handling scheme. The default is 'strict'.",
    "Naïve café — 日本語 🙂 tabs\tand\r\nwindows lines",
] * 20


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(TEXTS, vocab_size=400)


def test_special_tokens_come_first_and_round_trip(bpe):
    assert bpe.token_to_id(EOT_TOKEN) == 0 and bpe.token_to_id(PAD_TOKEN) == 1
    assert special_token_ids(bpe) == {"eot": 0, "pad": 1, "bos": None}
    assert 258 < bpe.get_vocab_size() <= 400
    unseen = "Ünïcode never seen: Ω≈ç√ 🚀 \x00\x7f and a long line " * 3
    for text in [*TEXTS[:3], unseen]:  # byte level: every string round-trips, seen in training or not
        assert bpe.decode(bpe.encode(text).ids) == text


def test_training_is_deterministic(bpe):
    assert tokenizer_hash(train_bpe(TEXTS, vocab_size=400)) == tokenizer_hash(bpe)


def test_saved_tokenizer_loads_in_transformers(bpe, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bpe.save(str(tmp_path / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = TEXTS[2] + EOT_TOKEN + TEXTS[0]
    assert hf.encode(text) == bpe.encode(text).ids
    assert hf.convert_tokens_to_ids(EOT_TOKEN) == 0
    assert hf.decode(hf.encode(TEXTS[2])) == TEXTS[2]


def test_load_from_file_and_directory(bpe, tmp_path):
    bpe.save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        assert tokenizer_hash(load_tokenizer(where)) == tokenizer_hash(bpe)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "nope.json", "no such tokenizer"),
        (lambda p: p, "no tokenizer.json"),
        (lambda p: (p / "tokenizer.json").write_text("{not json") and p / "tokenizer.json", "not a valid"),
    ],
)
def test_bad_local_tokenizer(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        load_tokenizer(make(tmp_path))


def test_hub_name_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    start = time.monotonic()
    with pytest.raises(DataError, match=r"no-such-org/no-such-tokenizer.*offline"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    assert time.monotonic() - start < 30  # generous: the point is "not a 25 s retry loop"


def test_a_tokenizer_without_end_of_text_gets_ours():
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert special_token_ids(tok) == {"eot": 2, "pad": 2, "bos": None}  # </s> is the EOS; pad falls back
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    assert special_token_ids(tok) == {"eot": None, "pad": None, "bos": None}  # a query changes nothing
    add_missing_eot(tok)
    assert special_token_ids(tok)["eot"] == 2 == tok.token_to_id(EOT_TOKEN)


def test_vocab_too_small():
    with pytest.raises(DataError, match="at least 258"):
        train_bpe(TEXTS, vocab_size=100)
