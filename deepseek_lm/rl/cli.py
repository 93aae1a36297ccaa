"""`deepseek-lm rl`: GRPO with verifiable rewards on a chat checkpoint (rl/session.py).

    deepseek-lm rl --checkpoint runs/chat --out runs/rl                          the built-in tasks, ~5 min
    deepseek-lm rl --checkpoint runs/arith-sft --task arithmetic --out runs/arith-rl
    deepseek-lm rl --checkpoint runs/chat --prompts p.jsonl --reward my_rewards:score --out runs/mine
    deepseek-lm rl --out runs/rl --resume                                        continue (its own settings)

Training and GRPO settings are `--train.*` flags and YAML keys (`--train.group_size 8`, `--train.kl_weight`,
`--train.clip_range`, `--train.temperature`, `--train.updates_per_batch`, ...), with RL's defaults
(`RL_DEFAULTS`); with --resume the run's saved ones.
"""

from __future__ import annotations

from typing import Any

from deepseek_lm.data.messages import warnings_to_stderr
from deepseek_lm.data.tasks import TASKS
from deepseek_lm.train import run_cli


def build_parser(train_defaults: dict[str, Any]):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from deepseek_lm.rl.config import RLConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    p = ArgumentParser(prog="deepseek-lm rl", description=__doc__.split("\n\n")[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    p.add_argument(
        "--checkpoint", type=str | None, default=None,
        help="the policy to start from (and the KL reference): a chat checkpoint or run directory",
    )  # fmt: skip
    p.add_argument(
        "--task", type=str | None, default=None,
        help=f"built-in tasks, comma-separated: {', '.join(TASKS)} (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--prompts", type=str | None, default=None,
        help='your prompts: JSONL of {"prompt": ...} or {"messages": [...]} plus the fields your reward reads',
    )  # fmt: skip
    p.add_argument(
        "--reward", type=str | None, default=None,
        help="your reward f(prompt, completion, **fields) -> float as module:function or file.py:function",
    )  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=0.05, help="--prompts held out for evaluation")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the --prompts train/held-out split")
    run_cli.add_run_arguments(
        p,
        "runs/rl",
        steps_help="steps (rollout batches)",
        seed_help="seed of the prompt order and the rollouts",
    )
    p.add_class_arguments(RLConfig, "train", instantiate=False)
    p.set_defaults({f"train.{k}": v for k, v in train_defaults.items()})
    return p


def resolve(argv: list[str]) -> tuple[Any, Any]:
    """RL's defaults, or with --resume the run's saved settings; then --config files and flags."""
    from deepseek_lm.rl.config import RL_DEFAULTS, RLConfig

    return run_cli.resolve(build_parser, {**RLConfig().to_dict(), **RL_DEFAULTS}, RLConfig, argv)


def main(argv: list[str]) -> int:
    from deepseek_lm.rl.session import rl

    try:
        ns, cfg = resolve(argv)
    except SystemExit as e:  # --help, --print_config
        return int(e.code or 0)
    tasks = [t.strip() for t in ns.task.split(",") if t.strip()] if ns.task else None
    with warnings_to_stderr("rl"):
        rl(
            ns.checkpoint, cfg, ns.out, tasks=tasks, prompts=ns.prompts, reward=ns.reward,
            val_fraction=ns.val_fraction, split_seed=ns.split_seed, resume=ns.resume, stop_at_step=ns.stop_at_step,
        )  # fmt: skip
    return 0
