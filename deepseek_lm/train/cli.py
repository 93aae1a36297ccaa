"""`deepseek-lm train`: flags from the `DeepSeekConfig` and `TrainConfig` dataclasses (jsonargparse).

    deepseek-lm train                                   the built-in demo (seed architecture, ~7 min on 2 cores)
    deepseek-lm train --preset tiny --out runs/t --max-steps 50
    deepseek-lm train --config my.yaml --train.lr 3e-4 --model.num_hidden_layers 6
    deepseek-lm train --out runs/t --resume             continue from the latest complete checkpoint

Precedence, lowest first: the preset (or, with --resume, the run's saved config), then --config files and
flags in the order given. The preset is applied as the parser's defaults, so it never overrides a flag.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.cli import parse_args
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError
from deepseek_lm.train import launch
from deepseek_lm.train.config import TRAIN_PRESETS, TrainConfig, preset_defaults
from deepseek_lm.train.precision import choose_device

# top-level shortcuts (SPEC §2 spellings) for train.* fields
SHORTCUTS = {
    "data_dir": "--data-dir",
    "max_steps": "--max-steps",
    "seed": "--seed",
    "wandb_project": "--wandb-project",
}


def build_parser(model_defaults: dict[str, Any], train_defaults: dict[str, Any]):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="deepseek-lm train", description=__doc__.split("\n\n")[0], exit_on_error=False
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="a YAML file of these options (a run's config.yaml works)"
    )
    parser.add_argument(
        "--preset", type=str | None, default=None,
        help=f"model + training settings: {', '.join(TRAIN_PRESETS)} (default seed; no arguments at all: demo)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=str | None, default=None, help="the run directory (default runs/PRESET)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest complete checkpoint in --out"
    )
    parser.add_argument(
        "--stop-at-step", type=int | None, default=None,
        help="end this invocation after that step (evaluate, save), keeping the schedule; continue with --resume",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir", type=str | None, default=None, help="a directory written by `deepseek-lm prepare`"
    )
    parser.add_argument(
        "--max-steps", type=int | None, default=None, help="optimizer steps (overrides epochs)"
    )
    parser.add_argument("--seed", type=int | None, default=None, help="seed of initialisation and data order")
    parser.add_argument("--wandb-project", type=str | None, default=None, help="log to Weights & Biases")
    parser.add_class_arguments(DeepSeekConfig, "model", instantiate=False)
    parser.add_class_arguments(TrainConfig, "train", instantiate=False)
    parser.set_defaults({f"model.{k}": v for k, v in model_defaults.items()})
    parser.set_defaults({f"train.{k}": v for k, v in train_defaults.items()})
    return parser


def resolve(argv: list[str]) -> tuple[DeepSeekConfig, TrainConfig, Path, bool, str, int | None]:
    """Two passes: the first finds the preset / run to take defaults from, the second applies the flags."""
    first = parse_args(build_parser(*preset_defaults("seed")), argv)
    preset = first.preset or ("demo" if not argv else "seed")
    out = Path(first.out or f"runs/{preset}")
    latest = ckpt.latest_checkpoint(out, training=True) if first.resume else None
    if latest is not None:  # the run's own settings, and the preset its config.yaml names (defaults aside)
        model_defaults, train_defaults = _saved_config(latest)
        preset = _saved_preset(out) or preset
    else:
        model_defaults, train_defaults = preset_defaults(preset)
    ns = parse_args(build_parser(model_defaults, train_defaults), argv)
    train_dict = ns.train.as_dict()
    for key in SHORTCUTS:
        if ns[key] is not None:
            train_dict[key] = ns[key]
    model = DeepSeekConfig.from_dict(ns.model.as_dict())
    return model, TrainConfig.from_dict(train_dict), out, ns.resume, preset, ns.stop_at_step


def _saved_config(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    model, train = ckpt.read_config_json(ckpt_dir)
    if train is None:
        raise UserError(f"{ckpt_dir / ckpt.CONFIG_FILE} has no training config: it cannot be resumed")
    return model.to_dict(), {**TrainConfig().to_dict(), **train}


def _saved_preset(out: Path) -> str | None:
    import yaml

    try:
        return yaml.safe_load((out / "config.yaml").read_text()).get("preset")
    except (OSError, yaml.YAMLError, AttributeError):  # missing or hand-edited: the label falls back
        return None


def make_room_for_demo(out: Path) -> None:
    """`make train` twice: the previous demo run moves aside (nothing the user had is deleted)."""
    if ckpt.list_checkpoints(out):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(out.stat().st_mtime))
        moved = out.with_name(f"{out.name}-{stamp}")
        out.rename(moved)
        print(f"the previous demo run moved to {moved}")


def main(argv: list[str]) -> int:
    import os

    from deepseek_lm.train.session import train

    try:
        model_config, train_config, out, resume, preset, stop_at_step = resolve(argv)
    except SystemExit as e:  # --help, --print_config
        return int(e.code or 0)
    if not argv and os.environ.get("RANK", "0") == "0":
        make_room_for_demo(out)
    if launch.wanted(train_config.cpu_processes, choose_device(train_config.device).type):
        return launch.launch(["train", *argv], train_config.cpu_processes)
    train(model_config, train_config, out, resume=resume, preset=preset, stop_at_step=stop_at_step)
    return 0
