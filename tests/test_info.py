import json

from deepseek_lm.checkpoint import save_model_dir
from deepseek_lm.cli import main
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model import get_model


def test_info_seed_preset_prints_true_counts(capsys):
    assert main(["info", "--preset", "seed"]) == 0
    out = capsys.readouterr().out
    assert "15,840,000" in out and "14,660,352" in out and "6,291,456" in out
    assert main(["info"]) == 0  # seed is the default
    assert "15,840,000" in capsys.readouterr().out


def test_info_json_matches_the_model(capsys):
    assert main(["info", "--preset", "tiny", "--json", "--seq-len", "128"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = get_model(DeepSeekConfig.from_preset("tiny"))
    assert {k: info[k] for k in model.param_counts()} == model.param_counts()
    assert info["flops_per_token"] == model.flops_per_token(128)


def test_info_reports_mtp_modules_apart(tmp_path, capsys):
    config = DeepSeekConfig.from_preset("tiny", num_nextn_predict_layers=1)
    save_model_dir(tmp_path / "ckpt", get_model(config))
    assert main(["info", "--checkpoint", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    counts = get_model(config).param_counts()
    assert counts["total"] == get_model(DeepSeekConfig.from_preset("tiny")).param_counts()["total"]
    assert f"MTP modules               1: {counts['mtp']:,} parameters" in out
    assert "used only by training and speculative decoding" in out


def test_info_from_a_checkpoint(tmp_path, capsys):
    config = DeepSeekConfig.from_preset("tiny", num_hidden_layers=1)
    save_model_dir(tmp_path / "ckpt", get_model(config))
    assert main(["info", "--checkpoint", str(tmp_path / "ckpt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total"] == get_model(config).param_counts()["total"]


def test_info_errors_are_one_line(capsys, tmp_path):
    assert main(["info", "--preset", "huge"]) == 2
    assert main(["info", "--preset", "seed", "--checkpoint", str(tmp_path)]) == 2
    assert main(["info", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "unknown preset 'huge'" in err[0] and "not both" in err[1]
