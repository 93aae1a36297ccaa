"""`deepseek-lm export` / `deepseek-lm import`: exit codes, one-line errors, a run directory as --checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepseek_lm.checkpoint import read_model_state, save_model_dir, save_training_checkpoint
from deepseek_lm.cli import main
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model import get_model

pytest.importorskip("transformers")  # only to mirror test_interop's requirements; the CLI never imports it


def checkpoint(path: Path, **overrides) -> Path:
    model = get_model(DeepSeekConfig.from_preset("tiny", **overrides))
    with torch.no_grad():
        model.layers[0].mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return save_model_dir(path, model.eval())


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_export_then_import_round_trip(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "ckpt")
    code, out, _ = run(
        capsys, "export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")
    )
    assert code == 0 and "deepseek_v3" in out
    assert "no tokenizer.json" in out  # told, not failed: this checkpoint has no tokenizer
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "deepseek_v3"
    code, out, _ = run(capsys, "import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert code == 0 and "imported" in out
    before, after = read_model_state(ckpt), read_model_state(tmp_path / "back")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_export_takes_a_run_directory(tmp_path, capsys):
    model = get_model(DeepSeekConfig.from_preset("tiny"))
    save_training_checkpoint(tmp_path / "run", 7, model.state_dict(), model.config, {"step": 7})
    code, _, _ = run(capsys, "export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file()


def test_unrepresentable_model_is_one_line(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "ckpt", scoring_func="softmax", norm_topk_prob=True)
    line = one_line_error(capsys, "export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"))
    assert line.startswith("deepseek-lm export: error:") and "norm_topk_prob" in line
    assert not (tmp_path / "hf").exists()


def test_bad_arguments_are_one_line(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "ckpt")
    line = one_line_error(capsys, "export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", "x")
    assert "format" in line and "onnx" in line and "gguf" in line  # the choices are named
    assert "out" in one_line_error(capsys, "export", "--checkpoint", str(ckpt))
    assert "no such checkpoint" in one_line_error(
        capsys, "export", "--checkpoint", str(tmp_path / "nope"), "--out", "x"
    )


def test_import_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = one_line_error(capsys, "import", "--hf", str(tmp_path / "llama"), "--out", str(tmp_path / "o"))
    assert "not a DeepSeek checkpoint" in line
    ckpt = checkpoint(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    capsys.readouterr()
    line = one_line_error(capsys, "import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o"))
    assert "missing tensor model.norm.weight" in line


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out
