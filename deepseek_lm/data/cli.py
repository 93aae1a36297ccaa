"""`deepseek-lm prepare`: one flag per `PrepareConfig` field (jsonargparse), then `prepare()`.

deepseek-lm prepare --out data_cache/builtin               # the built-in corpus
deepseek-lm prepare --data notes/ books/*.txt --out data/mine --vocab-size 4096
deepseek-lm prepare --dataset roneneldan/TinyStories --max-documents 100000 --out data/tinystories
deepseek-lm prepare --chat --out data_cache/chat                   # the built-in instruction set (for finetune)
deepseek-lm prepare --chat --data chats.jsonl --out data/chats     # your conversations, checked and split
"""

from __future__ import annotations

import dataclasses
import typing

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from deepseek_lm.cli import parse_args
from deepseek_lm.data.baselines import named
from deepseek_lm.data.messages import warnings_to_stderr
from deepseek_lm.data.preparation import PrepareConfig, PreparedData, prepare


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="deepseek-lm prepare",
        exit_on_error=False,
        description="Tokenise a corpus into memory-mapped token files with a manifest. "
        "With no --data or --dataset: the built-in corpus (Python standard-library docstrings and comments).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    helps = _attribute_docs(PrepareConfig)
    hints = typing.get_type_hints(PrepareConfig)
    for f in dataclasses.fields(PrepareConfig):
        flag, kind, help_ = "--" + f.name.replace("_", "-"), hints[f.name], helps.get(f.name)
        if kind is bool:
            parser.add_argument(flag, action=ActionYesNo(no_prefix="no-"), default=f.default, help=help_)
        elif typing.get_origin(kind) is list or list[str] in typing.get_args(kind):
            parser.add_argument(flag, type=str, nargs="+", default=f.default, metavar="PATH", help=help_)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_)
    parser.add_argument(
        "--chat", action=ActionYesNo(no_prefix="no-"), default=False,
        help="Conversations for `finetune` instead of text: the built-in instruction set, or chat .jsonl files / "
        "a dataset with a messages column, checked and split (no tokenising: finetune renders them).",
    )  # fmt: skip
    parser.add_argument(
        "--messages-field", type=str, default="messages", help="With --chat: the messages field."
    )
    return parser


def _attribute_docs(cls: type) -> dict[str, str]:
    """{field: description} from the "Attributes:" section of a dataclass docstring."""
    import docstring_parser  # installed with jsonargparse[signatures]

    return {p.arg_name: p.description or "" for p in docstring_parser.parse(cls.__doc__ or "").params}


def main(argv: list[str]) -> int:
    args = parse_args(build_parser(), argv)
    if args.chat:
        with warnings_to_stderr("prepare"):
            print(_chat_summary(_prepare_chat(args)))
        return 0
    fields = {f.name for f in dataclasses.fields(PrepareConfig)}
    cfg = PrepareConfig(**{k: v for k, v in vars(args).items() if k in fields})
    with warnings_to_stderr("prepare"):
        print(_summary(prepare(cfg)))
    return 0


def _summary(data: PreparedData) -> str:
    m = data.manifest
    train, val = m["splits"]["train"], m["splits"]["val"]
    bars = ", ".join(f"{name} {value:.3f}" for name, value in named(m).items())
    bars = f"{bars} bits/byte" if bars else "off"
    how = "reused (inputs unchanged)" if data.reused else f"prepared in {m['prepare_seconds']:.1f} s"
    return (
        f"{data.path}: {how}; {m['source']}; vocab {m['vocab_size']} ({m['dtype']}); "
        f"train {train['documents']} docs, {train['bytes']:,} bytes, {train['tokens']:,} tokens; "
        f"val {val['documents']} docs, {val['bytes']:,} bytes, {val['tokens']:,} tokens; baselines {bars}"
    )


def _prepare_chat(args):
    from deepseek_lm.data import DataError
    from deepseek_lm.data.chat_data import ChatPrepareConfig, prepare_chat

    if args.tokenizer or args.vocab_size:
        raise DataError("--tokenizer and --vocab-size do not apply to --chat: finetune uses the checkpoint's")
    return prepare_chat(
        ChatPrepareConfig(
            out=args.out,
            data=args.data,
            dataset=args.dataset,
            dataset_config=args.dataset_config,
            dataset_split=args.dataset_split,
            messages_field=args.messages_field,
            max_conversations=args.max_documents,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            force=args.force,
        )
    )


def _chat_summary(chat) -> str:
    m = chat.manifest
    how = "reused (inputs unchanged)" if chat.reused else f"prepared in {m['prepare_seconds']:.1f} s"
    splits = "; ".join(
        f"{name} {s['conversations']:,} conversations, {s['assistant_turns']:,} answers, {s['answer_bytes']:,} bytes"
        for name, s in m["splits"].items()
    )
    return f"{chat.path}: {how}; {m['source']}; split {m['split']}; {splits}"
