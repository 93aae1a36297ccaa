"""The compressor baselines (data/baselines.py): xz and zpaq bits per byte of a text given another.

zpaq's tests need the `zpaq` command (`make setup` installs Debian's package where apt-get is available, as CI
does); without it they are skipped and the test of its absence still runs.
"""

import base64
import lzma
import random
import shutil

import pytest

from deepseek_lm.cli import main
from deepseek_lm.data import baselines
from deepseek_lm.data.preparation import PrepareConfig, PreparedData, prepare

needs_zpaq = pytest.mark.skipif(shutil.which("zpaq") is None, reason="no zpaq command (apt-get install zpaq)")


def english(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = [
        "the",
        "value",
        "of",
        "a",
        "module",
        "returns",
        "list",
        "function",
        "name",
        "object",
        "class",
        "file",
        "path",
        "string",
    ]
    return " ".join(rng.choice(words) for _ in range(n_words)) + ".\n"


def noise(n_bytes: int, seed: int) -> str:
    """Base64 of random bytes: 6 bits of information per character, which no compressor can beat."""
    return base64.b64encode(random.Random(seed).randbytes(n_bytes * 3 // 4)).decode()


def test_xz_is_the_conditional_size_difference():
    train, val = [english(3000, 0)], [english(500, 1)]
    data_train, data_val = "".join(train).encode(), "".join(val).encode()
    size = lambda b: len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))  # noqa: E731
    expected = (size(data_train + data_val) - size(data_train)) * 8 / len(data_val)
    assert baselines.xz_bits_per_byte(train, val) == pytest.approx(expected, abs=1e-4)


@needs_zpaq
def test_zpaq_reads_what_the_text_holds():
    train = [english(4000, 0), noise(8000, 1)]
    # a copy of part of the training text costs next to nothing given it; noise costs its 6 bits a character
    assert baselines.zpaq_bits_per_byte(train, [train[0][:6000]]) < 0.3
    assert 5.8 < baselines.zpaq_bits_per_byte(train, [noise(8000, 2)]) < 6.3
    # on new text of the training text's kind, the context mixer needs fewer bits than xz
    fresh = [english(800, 3)]
    figures = baselines.compressor_baselines(train, fresh)
    assert 0 < figures["zpaq_bits_per_byte"] < figures["xz_bits_per_byte"]


@pytest.fixture
def corpus(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i}.txt").write_text(english(400, i))
    return tmp_path


@needs_zpaq
def test_prepare_caches_the_zpaq_figure_and_prints_it(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["prepare", "--data", str(corpus), "--out", str(out), "--vocab-size", "300", "--seq-len", "8"]
    assert main(argv) == 0
    manifest = PreparedData.open(out).manifest
    assert 0 < manifest["zpaq_bits_per_byte"] < manifest["xz_bits_per_byte"]
    assert f"zpaq -m5 {manifest['zpaq_bits_per_byte']:.3f}" in capsys.readouterr().out
    assert main(argv) == 0  # the cache: the figure is not computed again
    assert "reused" in capsys.readouterr().out
    assert PreparedData.open(out).manifest == manifest


def test_without_zpaq_the_figure_is_absent(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(baselines, "zpaq_command", lambda: None)
    out = tmp_path / "out"
    assert (
        main(["prepare", "--data", str(corpus), "--out", str(out), "--vocab-size", "300", "--seq-len", "8"])
        == 0
    )
    manifest = PreparedData.open(out).manifest
    assert manifest["zpaq_bits_per_byte"] is None and manifest["xz_bits_per_byte"] > 0
    printed = capsys.readouterr().out
    assert "baselines xz -9" in printed and "zpaq -m5" not in printed
    assert baselines.named(manifest) == {"xz -9": manifest["xz_bits_per_byte"]}


def test_a_failing_zpaq_warns_and_prepare_goes_on(corpus, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "zpaq"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'zpaq: out of memory' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(baselines, "zpaq_command", lambda: str(fake))
    cfg = PrepareConfig(out=str(tmp_path / "out"), data=[str(corpus)], vocab_size=300, seq_len=8)
    with pytest.warns(UserWarning, match="no zpaq baseline: .*failed \\(exit 1\\): zpaq: out of memory"):
        data = prepare(cfg)
    assert data.manifest["zpaq_bits_per_byte"] is None and data.manifest["xz_bits_per_byte"] > 0
