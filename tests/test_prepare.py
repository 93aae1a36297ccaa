import json
import math

import numpy as np
import pytest

from deepseek_lm.cli import main
from deepseek_lm.data import DataError
from deepseek_lm.data import preparation as prep
from deepseek_lm.data.preparation import (
    PrepareConfig,
    PreparedData,
    bits_per_byte,
    default_vocab_size,
    prepare,
    prepare_builtin,
)

CONTRACT_KEYS = {
    "source", "tokenizer", "tokenizer_hash", "vocab_size", "dtype", "eot_token_id", "pad_token_id",
    "bos_token_id", "split_seed", "val_fraction", "splits", "xz_bits_per_byte", "zpaq_bits_per_byte",
}  # fmt: skip


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> PreparedData:
    # zpaq's figure is tested on small texts (test_baselines.py): here it would add ~25 s
    return prepare_builtin(tmp_path_factory.mktemp("data") / "builtin", vocab_size=1024, zpaq_baseline=False)


def split_docs(data: PreparedData, split: str) -> list[str]:
    """Decode a token file back into its documents (each ends with the end-of-text token)."""
    ids, eot = data.tokens(split).tolist(), data.manifest["eot_token_id"]
    assert ids[-1] == eot
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == eot:
            docs.append(data.tokenizer.decode(ids[start:i]))
            start = i + 1
    return docs


def test_builtin_corpus_prepares(builtin):
    m = builtin.manifest
    assert m.keys() >= CONTRACT_KEYS
    assert (
        m["vocab_size"] == 1024
        and m["dtype"] == "uint16"
        and m["eot_token_id"] == 0
        and m["pad_token_id"] == 1
    )
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["bytes"] + val["bytes"] >= 1_500_000
    library = train["documents"] - m["training_only_documents"] + val["documents"]
    assert val["documents"] == round(0.05 * library)  # the library's modules are split; the test suites train
    assert len(builtin.tokens("train")) == train["tokens"] and len(builtin.tokens("val")) == val["tokens"]
    assert 0.5 < m["xz_bits_per_byte"] < 4
    assert builtin.bytes_per_token("val") == val["bytes"] / val["tokens"]
    assert len(split_docs(builtin, "val")) == val["documents"]


def test_the_test_suites_train_and_validation_stays_the_librarys(builtin):
    """The test suites' documents join the training split only: both splits of the library's modules are
    those the library alone splits into, and the test suites' documents follow them in training."""
    from deepseek_lm.data import sources as src

    train, val, _ = prep.split_documents(src.builtin_documents(), 0.05, 0)
    assert split_docs(builtin, "val") == val
    extra = builtin.manifest["training_only_documents"]
    assert extra > 0 and split_docs(builtin, "train")[:-extra] == train


def test_val_txt_encodes_to_val_bin(builtin):
    text = (builtin.path / "val.txt").read_text(encoding="utf-8")
    assert builtin.tokenizer.encode(text).ids == builtin.tokens("val").tolist()


def test_unchanged_inputs_reuse_the_cache(builtin):
    again = prepare_builtin(builtin.path, vocab_size=1024, zpaq_baseline=False)
    assert again.reused and again.manifest == builtin.manifest


def test_default_vocabulary_is_4096_for_the_builtin_corpus_else_8192():
    assert default_vocab_size(PrepareConfig()) == 4096
    assert default_vocab_size(PrepareConfig(data=["notes/"], out="o")) == 8192
    assert default_vocab_size(PrepareConfig(dataset="roneneldan/TinyStories", out="o")) == 8192


def write_mixed_dir(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "nested").mkdir(parents=True)
    docs = {
        "a.txt": ["A plain text file.\nIts second line, with ünïcode and 🙂.\n"],
        "b.md": ["# Title\n\nSome *markdown* text."],
        "nested/c.jsonl": [
            f"json document {i}: the quick brown fox jumps over the lazy dog" for i in range(8)
        ],
        "nested/d.parquet": [f"parquet row {i}\twith a tab" for i in range(6)],
    }
    (root / "a.txt").write_text(docs["a.txt"][0])
    (root / "b.md").write_text(docs["b.md"][0])
    (root / "nested/c.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in docs["nested/c.jsonl"])
    )
    pq.write_table(pa.table({"text": docs["nested/d.parquet"]}), root / "nested/d.parquet")
    return [t for ts in docs.values() for t in ts]


def test_mixed_directory_round_trips_through_the_cli(tmp_path, capsys):
    expected = write_mixed_dir(tmp_path / "corpus")
    out = tmp_path / "out"
    argv = ["prepare", "--data", str(tmp_path / "corpus"), "--out", str(out), "--vocab-size", "300"]
    assert main([*argv, "--seq-len", "16", "--val-fraction", "0.2"]) == 0
    assert "train 13 docs" in capsys.readouterr().out
    data = PreparedData.open(out)
    train, val = split_docs(data, "train"), split_docs(data, "val")
    assert len(val) == 3 and sorted(train + val) == sorted(expected)  # decode(encode(text)) == text
    assert [d for d in expected if d in train] == train  # source order kept within a split


def test_changed_inputs_invalidate_the_cache(tmp_path):
    (tmp_path / "a.txt").write_text("one two three four five six seven\n" * 40)
    (tmp_path / "b.txt").write_text("eight nine ten\n" * 40)
    cfg = dict(out=str(tmp_path / "out"), data=[str(tmp_path)], vocab_size=300, seq_len=8, xz_baseline=False)
    first = prepare(PrepareConfig(**cfg))
    assert prepare(PrepareConfig(**cfg)).reused
    assert not prepare(PrepareConfig(**cfg, split_seed=1)).reused
    (tmp_path / "b.txt").write_text("eleven twelve\n" * 40)
    rebuilt = prepare(PrepareConfig(**cfg))
    assert not rebuilt.reused and rebuilt.manifest["cache_key"] != first.manifest["cache_key"]


def test_one_document_is_split_by_position(tmp_path):
    lines = [f"line {i} of the only file" for i in range(100)]
    (tmp_path / "only.txt").write_text("\n".join(lines))
    data = prepare(
        PrepareConfig(out=str(tmp_path / "out"), data=[str(tmp_path / "only.txt")], vocab_size=300, seq_len=8)
    )
    m = data.manifest
    assert m["split"] == "by position (one document)"
    train, val = split_docs(data, "train"), split_docs(data, "val")
    assert train[0] + val[0] == "\n".join(lines) and val[0].startswith(
        "line 96 "
    )  # the first line start after 95 %


def test_a_failed_prepare_leaves_the_old_directory_alone(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("some words to tokenise\n" * 50)
    (tmp_path / "b.txt").write_text("other words\n" * 50)
    cfg = dict(
        out=str(tmp_path / "out"),
        data=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
        vocab_size=300,
        seq_len=8,
    )
    before = prepare(PrepareConfig(**cfg)).manifest

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "compressor_baselines", crash)  # dies after the token files are written
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(**cfg, split_seed=3))
    assert PreparedData.open(tmp_path / "out").manifest == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.txt",
        "b.txt",
        "out",
    ]  # no partial directory left


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "a.txt").write_text("words " * 100)
    (tmp_path / "b.txt").write_text("other words " * 100)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("keep me")
    with pytest.raises(DataError, match="mine: exists and is not a prepared data directory"):
        prepare(PrepareConfig(out=str(tmp_path / "mine"), data=[str(tmp_path / "*.txt")], seq_len=8))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.md"]


def test_output_inside_the_data_directory_is_not_read_back(tmp_path):
    (tmp_path / "a.txt").write_text("words " * 100)
    (tmp_path / "b.txt").write_text("other words " * 100)
    cfg = PrepareConfig(out=str(tmp_path / "prepared"), data=[str(tmp_path)], vocab_size=300, seq_len=8)
    assert prepare(cfg).manifest["splits"]["train"]["documents"] == 1
    assert prepare(cfg).reused  # its own val.txt is not a new input


def test_vocabulary_over_65536_uses_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(" ".join(f"w{i}" for i in range(69_990, 70_000)))
    data = prepare(
        PrepareConfig(
            out=str(tmp_path / "out"), data=[str(tmp_path / "*.txt")], tokenizer=str(tmp_path), seq_len=4
        )
    )
    m = data.manifest
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70_002 and m["eot_token_id"] == 70_001  # ours added
    assert data.tokens("train").tolist() == [*range(69_990, 70_000), 70_001]


def test_prepared_data_open_errors(tmp_path, builtin):
    with pytest.raises(DataError, match="not a prepared data directory"):
        PreparedData.open(tmp_path)
    import shutil

    shutil.copytree(builtin.path, tmp_path / "copy")
    with open(tmp_path / "copy" / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"val.bin: missing or truncated") as e:
        PreparedData.open(tmp_path / "copy")
    # the fix names where the data came from, and the whole command's flags inside the backticks
    assert "`deepseek-lm prepare` with its inputs (builtin: Python" in str(e.value)
    assert str(e.value).endswith(f"`--out {tmp_path / 'copy'} --force`")


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), tokens=100, n_bytes=100) == pytest.approx(1.0)
    assert bits_per_byte(2.0, tokens=10, n_bytes=40) == pytest.approx(2.0 * 10 / 40 / math.log(2))


# bad input through the command line: one line on stderr, exit status 2, no traceback (SPEC §9)


def _bad(name, content):
    def make(tmp_path):
        path = tmp_path / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return ["--data", str(path)]

    return make


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: ["--data", str(p / "missing.txt")], "missing.txt: no such file or directory"),
        (_bad("empty.txt", b""), "empty.txt: the file is empty"),
        (_bad("empty_dir", None), "empty_dir: the directory holds no .txt"),
        (_bad("short.txt", b"far too short"), "the corpus is too short: .* training tokens, fewer than 514"),
        (_bad("d.jsonl", b'{"text": "a"}\n{oops\n'), "d.jsonl:2: not valid JSON"),
        (_bad("d.jsonl", b'{"text": "a"}\n{"body": "b"}\n'), "d.jsonl:2: no 'text' field"),
        (
            lambda p: ["--dataset", "some-org/some-dataset"],
            "--dataset some-org/some-dataset: offline mode is on",
        ),
        (lambda p: ["--val-fraction", "1.5"], "--val-fraction 1.5: must lie strictly between 0 and 1"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, make, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["prepare", *make(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepseek-lm prepare: error: ") and "Traceback" not in err
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_warns_on_one_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 " * 300)
    (tmp_path / "b.txt").write_bytes(b"ok " * 300)
    assert (
        main(
            [
                "prepare",
                "--data",
                str(tmp_path / "a.txt"),
                str(tmp_path / "b.txt"),
                "--out",
                str(tmp_path / "o"),
                "--seq-len",
                "8",
                "--vocab-size",
                "260",
            ]
        )
        == 0
    )
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"deepseek-lm prepare: warning: replaced 300 invalid UTF-8 byte sequence(s) with U+FFFD in 1 file(s): {tmp_path / 'a.txt'}"
    ]
    assert np.asarray(PreparedData.open(tmp_path / "o").tokens("train")).size > 0


def test_prepare_name_is_the_function_even_after_the_module_loads():
    import deepseek_lm.data.preparation  # noqa: F401
    from deepseek_lm.data import prepare as prepare_fn

    assert callable(prepare_fn) and prepare_fn.__name__ == "prepare"
