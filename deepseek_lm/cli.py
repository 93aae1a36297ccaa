"""`deepseek-lm SUBCOMMAND ...`: dispatch to the subcommand's own thin entry point.

Each subcommand lives beside the library code it calls (`deepseek_lm/data/cli.py`, ...) and is imported only
when chosen, so `deepseek-lm info` never pays for `datasets` or `matplotlib`. Errors the user can fix
(`UserError`) become one line on stderr; add `--debug` anywhere for the full traceback.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from typing import Any

from deepseek_lm.errors import Notice, UserError, silence_library_noise

# name -> ("module:function", one-line help). The function takes the remaining argv, returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("deepseek_lm.data.cli:main", "tokenise a corpus into memory-mapped token files"),
    "train": ("deepseek_lm.train.cli:main", "train a model (no arguments: the built-in demo)"),
    "finetune": ("deepseek_lm.train.finetune_cli:main", "fine-tune a checkpoint on conversations (chat SFT)"),
    "rl": ("deepseek_lm.rl.cli:main", "reinforcement learning with verifiable rewards (GRPO)"),
    "generate": ("deepseek_lm.generate.cli:main_generate", "sample text from a checkpoint"),
    "eval": ("deepseek_lm.generate.cli:main_eval", "loss, perplexity and bits per byte of a checkpoint"),
    "export": ("deepseek_lm.interop.cli:main_export", "export a checkpoint (Hugging Face or GGUF format)"),
    "import": ("deepseek_lm.interop.cli:main_import", "import a Hugging Face directory or a GGUF file"),
    "info": ("deepseek_lm.info:main", "parameter counts and FLOPs per token of a preset or checkpoint"),
    "bench": ("deepseek_lm.bench:main", "training and decoding throughput, optionally against transformers"),
    "serve": ("deepseek_lm.serve.cli:main", "an OpenAI-compatible HTTP server and a playground page"),
}


def _usage() -> str:
    lines = ["usage: deepseek-lm [--debug] SUBCOMMAND [ARGS ...]", "", "subcommands:"]
    lines += [f"  {name:<10}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`deepseek-lm SUBCOMMAND --help` for the options of one subcommand."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DEEPSEEK_LM_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if debug:  # processes this one launches (train.cpu_processes) report their errors the same way
        os.environ["DEEPSEEK_LM_DEBUG"] = "1"
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from deepseek_lm import __version__

        print(f"deepseek-lm {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(
            f"deepseek-lm: error: unknown subcommand {name!r}; choose one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    code = _run(name, argv[1:], debug)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process of a torchrun job, its work done
        # Leave without interpreter finalization: there a C++ teardown of the distributed backend sometimes
        # aborted the process ("terminate called without an active exception", with no Python frame left on
        # the stack) after a finished run, and torchrun then reported the whole job as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(name: str, rest: list[str], debug: bool) -> int:
    """The subcommand's exit code; errors become one line on stderr (or a traceback with --debug)."""
    module_name, func_name = COMMANDS[name][0].split(":")
    if not debug:
        _one_line_notices(name)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        code = int(func(rest) or 0)
        sys.stdout.flush()  # here, not at exit, a reader that left early (`| head`) is met by the handler
        return code
    except UserError as e:
        if debug:
            raise
        print(f"deepseek-lm {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepseek-lm {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`... | head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe stopped
    except OSError as e:  # a full disk, a permission problem: name the file, no traceback
        if debug:
            raise
        print(f"deepseek-lm {name}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            raise
        print(
            f"deepseek-lm {name}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line_notices(name: str) -> None:
    """Our notices as one line each (`deepseek-lm NAME: message`), not Python's file:line and source
    line; other warnings as Python shows them, less one of torch's own that says nothing to a user."""
    # a command run again in the same process (tests, a notebook) replaces its own display, not wraps it
    python_show = getattr(warnings.showwarning, "python_show", warnings.showwarning)

    def show(message, category, filename, lineno, file=None, line=None):  # warnings.showwarning's signature
        if issubclass(category, Notice):
            print(f"deepseek-lm {name}: {message}", file=sys.stderr if file is None else file)
        else:
            python_show(message, category, filename, lineno, file, line)

    show.python_show = python_show
    warnings.showwarning = show
    silence_library_noise()


def parse_args(parser: Any, argv: list[str]) -> Any:
    """A subcommand's `parser.parse_args(argv)` (a jsonargparse parser made with exit_on_error=False): a bad,
    missing or unknown option is one `UserError` line naming the option, what it takes and the value given."""
    import argparse

    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise UserError(f"{_argument_error(parser, str(e))}; see `{parser.prog} --help`") from None


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}


def _argument_error(parser: Any, text: str) -> str:
    """jsonargparse's several-line message, e.g. 'Parser key "top_k":\n Does not validate against any of the
    Union subtypes ... Given value: big', as '--top-k: expected an integer, got 'big''."""
    flag_of = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    key = re.match(r'Parser key "([^"]+)":', text)
    if key is None:  # "unrecognized arguments: ...", "the following arguments are required: ..."
        text = re.sub(
            r"(?<=required: ).*", lambda m: re.sub(r"[\w.]+", lambda d: flag_of.get(d[0], d[0]), m[0]), text
        )
        return " ".join(text.split())
    flag, detail = flag_of.get(key[1], key[1]), " ".join(text[key.end() :].split())
    given = re.findall(r"(?:Got|Given) value: (.*)", text)
    expected = []
    for literal, name in re.findall(r"Expected a (typing\.Literal\[.*?\])?(?:<class '(\w+)'>)?", text):
        word = f"one of {literal[len('typing.Literal[') : -1]}" if literal else _TYPE_WORDS.get(name)
        if word and word not in expected:  # NoneType, the default of an optional value, is not typed
            expected.append(word)
    if not (given and expected):  # e.g. a --config file that does not exist
        return f"{flag}: {detail}"
    return f"{flag}: expected {' or '.join(expected)}, got {given[-1].strip()!r}"
