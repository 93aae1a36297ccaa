import json
import math

import pytest
from _trained_tiny import trained_tiny_run

from deepseek_lm.checkpoint import load_checkpoint, save_model_dir
from deepseek_lm.cli import main
from deepseek_lm.train.monitor import read_metrics


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


def _eval(argv, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    assert main(["eval", *argv, "--json", str(out_json)]) == 0
    return json.loads(out_json.read_text()), capsys.readouterr().out


def test_eval_reproduces_the_runs_last_validation_loss(run_dir, tmp_path, capsys):
    last = [r for r in read_metrics(run_dir, "eval") if r["full"]][-1]
    report, out = _eval(["--checkpoint", str(run_dir)], tmp_path, capsys)
    assert report["loss"] == pytest.approx(last["loss"], abs=1e-6)
    assert report["tokens"] == last["tokens"]
    assert report["bits_per_byte"] == pytest.approx(last["bits_per_byte"], abs=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(last["loss"]), rel=1e-6)
    assert report["xz_bits_per_byte"] is not None and "xz -9" in out
    assert f"{last['loss']:.4f}" in out


def test_eval_on_text_files(run_dir, tmp_path, capsys):
    ckpt = load_checkpoint(run_dir)
    text = "the function returns a list of values from the module. " * 40
    f = tmp_path / "notes.txt"
    f.write_text(text)
    report, _ = _eval(["--checkpoint", str(run_dir), "--data", str(f)], tmp_path, capsys)
    tokens = len(ckpt.tokenizer.encode(text).ids) + 1  # + the end-of-text token after the document
    assert math.isfinite(report["loss"]) and report["tokens"] > 0
    # bits per byte: the loss over all the text's tokens, per byte of it
    expected = report["loss"] * tokens / (math.log(2) * len(text.encode()))
    assert report["bits_per_byte"] == pytest.approx(expected, rel=1e-9)
    assert report["xz_bits_per_byte"] is not None  # the run's training data is at hand


def test_eval_max_batches_and_no_xz_without_training_data(run_dir, tmp_path, capsys):
    ckpt = load_checkpoint(run_dir)
    bare = save_model_dir(tmp_path / "bare", ckpt.model, ckpt.tokenizer, train_config=None)
    f = tmp_path / "notes.md"
    f.write_text("the value of the module " * 100)
    argv = ["--checkpoint", str(bare), "--data", str(f), "--seq-len", "16", "--batch-size", "2"]
    report, out = _eval([*argv, "--max-batches", "1"], tmp_path, capsys)
    assert report["tokens"] == 32 and report["seq_len"] == 16
    assert report["xz_bits_per_byte"] is None and "no compressor baselines" in report["note"]
    assert "note" in out


@pytest.mark.parametrize(
    "argv, word",
    [
        (["--data", "a.txt", "--data-dir", "d"], "not both"),
        (["--data", "missing-file.txt"], "missing-file.txt"),
        (["--data-dir", "no-such-dir"], "no-such-dir"),
    ],
)
def test_eval_bad_input_is_one_line_error(run_dir, capsys, argv, word):
    assert main(["eval", "--checkpoint", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and word in err


def test_eval_of_a_checkpoint_without_training_data_needs_data(run_dir, tmp_path, capsys):
    ckpt = load_checkpoint(run_dir)
    bare = save_model_dir(tmp_path / "bare", ckpt.model, ckpt.tokenizer, train_config=None)
    assert main(["eval", "--checkpoint", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--data" in err
