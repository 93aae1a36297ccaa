"""`deepseek-lm train` configuration: presets as defaults, flags and YAML on top, one-line errors."""

import pytest
import torch
import yaml

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError
from deepseek_lm.train.cli import main, resolve
from deepseek_lm.train.config import TRAIN_PRESETS, TrainConfig, padded_vocab, preset_defaults


def test_defaults_are_the_seed_recipe():
    cfg = TrainConfig()
    assert (cfg.micro_batch_size, cfg.grad_accum_steps, cfg.seq_len) == (4, 8, 256)
    assert (cfg.lr, cfg.epochs, cfg.warmup_steps, cfg.grad_clip) == (1e-4, 5.0, 1000, 0.5)


@pytest.mark.parametrize("name", list(TRAIN_PRESETS))
def test_every_preset_builds_valid_configs(name):
    model, train = preset_defaults(name)
    DeepSeekConfig.from_dict(model)
    TrainConfig.from_dict(train)


def test_no_arguments_is_the_demo():
    model, train, out, resume, preset, stop_at = resolve([])
    assert preset == "demo" and str(out) == "runs/demo" and not resume and stop_at is None
    assert model == DeepSeekConfig() and train.lr == TRAIN_PRESETS["demo"]["lr"]


def test_flags_win_over_the_preset_in_any_order():
    for argv in (
        ["--preset", "tiny", "--train.lr", "0.5", "--max-steps", "7"],
        ["--train.lr", "0.5", "--max-steps", "7", "--preset", "tiny"],
    ):
        model, train, out, *_ = resolve(argv)
        assert model.hidden_size == DeepSeekConfig.from_preset("tiny").hidden_size
        assert (train.lr, train.max_steps) == (0.5, 7)
        assert str(out) == "runs/tiny"


def test_yaml_config_and_shortcuts(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"preset": "tiny", "model": {"num_hidden_layers": 3}, "train": {"lr": 0.01}})
    )
    model, train, *_ = resolve(
        ["--config", str(path), "--data-dir", "d", "--seed", "5", "--wandb-project", "p"]
    )
    assert model.num_hidden_layers == 3 and train.lr == 0.01
    assert (train.data_dir, train.seed, train.wandb_project) == ("d", 5, "p")


def test_a_saved_config_yaml_reproduces_the_run(tmp_path):
    model, train, *_ = resolve(["--preset", "tiny", "--train.lr", "0.02"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": model.to_dict(), "train": train.to_dict()}))
    model2, train2, *_ = resolve(["--config", str(path)])
    assert model2 == model and train2 == train


def test_resume_takes_the_runs_saved_config(tmp_path):
    config = DeepSeekConfig.from_preset("tiny", hidden_size=48)
    saved = TrainConfig(lr=0.07, max_steps=9).to_dict()
    ckpt.save_training_checkpoint(tmp_path, 9, {"w": torch.zeros(1)}, config, {"s": 1}, train_config=saved)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"preset": "tiny", "model": config.to_dict()}))
    model, train, _, _, preset, _ = resolve(["--out", str(tmp_path), "--resume", "--max-steps", "20"])
    assert model == config and train.lr == 0.07 and train.max_steps == 20
    assert preset == "tiny"  # the run's, not the default seed's: config.yaml is rewritten with it


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--train.lr", "abc"], "train.lr"),
        (["--train.lrr", "1"], "train.lrr"),
        (["--preset", "nope"], "nope"),
        (["--model.num_experts_per_tok", "9"], "num_experts_per_tok"),
        (["--train.micro_batch_size", "0"], "micro_batch_size"),
    ],
)
def test_bad_input_is_one_line(argv, needle):
    with pytest.raises(UserError) as info:
        resolve(argv)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--train.lr" in capsys.readouterr().out


def test_padded_vocab():
    assert padded_vocab(8192, 64) == 8192 and padded_vocab(8193, 64) == 8256 and padded_vocab(50, 64) == 64
