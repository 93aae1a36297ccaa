"""`deepseek-lm finetune`: fine-tune a checkpoint on conversations (train/finetune.py).

    deepseek-lm finetune --checkpoint runs/demo --out runs/chat                    the built-in instruction set
    deepseek-lm finetune --checkpoint runs/demo --data chats.jsonl --out runs/mine  OpenAI-style messages lines
    deepseek-lm finetune --checkpoint runs/demo --dataset NAME --out runs/hub       a dataset's messages column
    deepseek-lm finetune --checkpoint runs/chat --task arithmetic --out runs/arith  a verifiable task's answers (rl)
    deepseek-lm finetune --out runs/chat --resume                                   continue (its own settings)

Training settings are `--train.*` flags and YAML keys as for `train`, with fine-tuning's defaults
(`FINETUNE_DEFAULTS`); with --resume the run's saved ones. Bad lines are named on stderr, one line each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepseek_lm.data.messages import warnings_to_stderr
from deepseek_lm.errors import UserError
from deepseek_lm.train import run_cli
from deepseek_lm.train.config import TrainConfig


def build_parser(train_defaults: dict[str, Any]):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    p = ArgumentParser(prog="deepseek-lm finetune", description=__doc__.split("\n\n")[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    p.add_argument(
        "--checkpoint",
        type=str | None,
        default=None,
        help="the model to fine-tune: a checkpoint or run directory",
    )
    p.add_argument(
        "--data", type=str | None, default=None,
        help="chat JSONL ({\"messages\": [...]} per line) or a directory from `prepare --chat` (default: the built-in set)",
    )  # fmt: skip
    p.add_argument(
        "--dataset", type=str | None, default=None, help="a Hugging Face dataset with a messages column"
    )
    p.add_argument(
        "--task", type=str | None, default=None,
        help="built-in verifiable tasks' questions and answers, comma-separated (module, signature, functions, "
        "arithmetic): the answer format to learn before `rl`",
    )  # fmt: skip
    p.add_argument("--dataset-config", type=str | None, default=None, help="the dataset's configuration")
    p.add_argument("--dataset-split", type=str, default="train", help="the dataset's split")
    p.add_argument(
        "--max-conversations", type=int | None, default=None, help="read at most this many from --dataset"
    )
    p.add_argument("--messages-field", type=str, default="messages", help="the field holding the messages")
    p.add_argument("--val-fraction", type=float, default=0.05, help="conversations held out for evaluation")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    run_cli.add_run_arguments(
        p, "runs/chat", steps_help="optimizer steps (overrides epochs)", seed_help="seed of the data order"
    )
    p.add_class_arguments(TrainConfig, "train", instantiate=False)
    p.set_defaults({f"train.{k}": v for k, v in train_defaults.items()})
    return p


def resolve(argv: list[str]) -> tuple[Any, TrainConfig]:
    """Fine-tuning's defaults, or with --resume the run's saved settings; then --config files and flags."""
    from deepseek_lm.train.finetune import FINETUNE_DEFAULTS

    return run_cli.resolve(build_parser, {**TrainConfig().to_dict(), **FINETUNE_DEFAULTS}, TrainConfig, argv)


def main(argv: list[str]) -> int:
    from deepseek_lm.data.chat_data import ChatPrepareConfig, is_chat_dir
    from deepseek_lm.train.finetune import finetune

    try:
        ns, cfg = resolve(argv)
    except SystemExit as e:  # --help, --print_config
        return int(e.code or 0)
    if sum(map(bool, (ns.data, ns.dataset, ns.task))) > 1:
        raise UserError("give one of --data, --dataset and --task")
    data: Any = None
    if ns.data and Path(ns.data).is_dir() and is_chat_dir(ns.data):
        data = ns.data
    elif ns.data or ns.dataset or ns.task:
        data = ChatPrepareConfig(
            data=[ns.data] if ns.data else None, dataset=ns.dataset, dataset_config=ns.dataset_config,
            tasks=[t.strip() for t in ns.task.split(",") if t.strip()] if ns.task else None,
            dataset_split=ns.dataset_split, messages_field=ns.messages_field,
            max_conversations=ns.max_conversations, val_fraction=ns.val_fraction, split_seed=ns.split_seed,
        )  # fmt: skip
    elif (ns.val_fraction, ns.split_seed) != (0.05, 0):
        data = ChatPrepareConfig(val_fraction=ns.val_fraction, split_seed=ns.split_seed)
    with warnings_to_stderr("finetune"):
        finetune(ns.checkpoint, cfg, ns.out, data=data, resume=ns.resume, stop_at_step=ns.stop_at_step)
    return 0
