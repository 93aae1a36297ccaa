"""What `finetune` and `rl` parse alike: the run's options, and settings resolved from their defaults, or
with --resume from the run's saved ones, then --config files and flags."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.cli import parse_args

SHORTCUTS = {"max_steps": "--max-steps", "seed": "--seed", "wandb_project": "--wandb-project"}


def add_run_arguments(p: Any, out: str, steps_help: str, seed_help: str) -> None:
    """--out, --resume, --stop-at-step and the `SHORTCUTS` for `--train.*` settings."""
    p.add_argument("--out", type=str, default=out, help="the run directory")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest complete checkpoint in --out"
    )
    p.add_argument(
        "--stop-at-step", type=int | None, default=None, help="end this invocation after that step"
    )
    p.add_argument("--max-steps", type=int | None, default=None, help=steps_help)
    p.add_argument("--seed", type=int | None, default=None, help=seed_help)
    p.add_argument("--wandb-project", type=str | None, default=None, help="log to Weights & Biases")


def resolve(
    build_parser: Callable[[dict[str, Any]], Any], defaults: dict[str, Any], config_cls: Any, argv: list[str]
) -> tuple[Any, Any]:
    """(namespace, config): `defaults`, or with --resume the run's saved settings over them; then --config
    files and flags, the shortcuts last."""
    first = parse_args(build_parser(defaults), argv)
    latest = ckpt.latest_checkpoint(first.out, training=True) if first.resume else None
    if latest is not None:
        _, saved = ckpt.read_config_json(latest)
        defaults = {**defaults, **(saved or {})}
    ns = parse_args(build_parser(defaults), argv)
    train = ns.train.as_dict()
    train.update({key: ns[key] for key in SHORTCUTS if ns[key] is not None})
    return ns, config_cls.from_dict(train)
