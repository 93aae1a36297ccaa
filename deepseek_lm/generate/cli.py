"""`deepseek-lm generate` and `deepseek-lm eval`: parse arguments, call the library, print.

deepseek-lm generate --checkpoint runs/demo --prompt "Return the" --max-new-tokens 64
deepseek-lm generate --checkpoint runs/demo --prompt-file prompts.txt --temperature 0   # a batch
echo "Once upon" | deepseek-lm generate --checkpoint runs/demo --prompt -
deepseek-lm generate --checkpoint runs/demo --interactive
deepseek-lm generate --checkpoint runs/chat --chat                   # a chat with history (fine-tuned model)
deepseek-lm generate --checkpoint runs/chat --chat --prompt "What does `json.dumps` do?"
deepseek-lm generate --checkpoint runs/demo --prompt "Once" --max-new-tokens 2000 --compile   # long outputs
deepseek-lm generate --checkpoint runs/mtp --prompt "The" --speculative        # drafts from the MTP module
deepseek-lm eval --checkpoint runs/demo                  # the training run's validation split
deepseek-lm eval --checkpoint runs/demo --data notes.md  # any text files
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from deepseek_lm.cli import parse_args
from deepseek_lm.errors import Notice, UserError, silence_library_noise
from deepseek_lm.generate.sampling import SamplingConfig

_ESCAPES = {"\\n": "\n", "\\t": "\t"}


def _generate_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="deepseek-lm generate",
        exit_on_error=False,
        description="Sample text from a checkpoint. One prompt is streamed to the terminal as it is "
        "generated; several prompts (--prompt repeated, or --prompt-file) are decoded together as one batch.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, or a run directory (its best checkpoint, else the latest)",
    )
    p.add_argument("--prompt", action="append", type=str, help="prompt text ('-': read stdin); repeatable")
    p.add_argument("--prompt-file", type=str, help="a text file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument(
        "--top-k", type=int | None, default=200, help="sample from the k most likely tokens (0: all)"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    p.add_argument("--seed", type=int | None, default=None, help="fixes the sample")
    p.add_argument("--stop", nargs="+", type=str, help="stop strings (\\n and \\t are understood)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (from --prompt-file)")
    p.add_argument("--interactive", action="store_true", help="a prompt loop; Ctrl-D quits")
    p.add_argument(
        "--chat", action="store_true",
        help="chat through the checkpoint's chat template: each --prompt is a user message; none: a terminal chat",
    )  # fmt: skip
    p.add_argument("--system", type=str | None, default=None, help="with --chat: a system message")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step: ~20 s once per batch size, then faster tokens (long outputs)",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="decode without the step compiled ahead of time (the default on a CPU: compiled once per model "
        "configuration and batch size, ~1 min, and cached on disk)",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative decoding with the checkpoint's MTP module: same output (greedy) or the same "
        "distribution (sampling), fewer steps of the main model",
    )
    p.add_argument("--draft-tokens", type=int, default=1, help="with --speculative: tokens drafted per round")
    return p


def main_generate(argv: list[str]) -> int:
    args = parse_args(_generate_parser(), argv)
    prompts = _read_prompts(args.prompt, args.prompt_file)
    if not prompts and not args.interactive and not args.chat:
        raise UserError(
            "no prompt: give --prompt TEXT, --prompt - (stdin), --prompt-file FILE or --interactive"
        )
    if args.max_new_tokens < 0 or args.batch_size <= 0:
        raise UserError(
            f"need --max-new-tokens >= 0 and --batch-size > 0 ({args.max_new_tokens}, {args.batch_size})"
        )
    # checked before the (slower) checkpoint load
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    from deepseek_lm.generate.engine import Engine

    if args.speculative and args.repetition_penalty != 1:
        raise UserError("--repetition-penalty is not supported with --speculative; leave it at 1")
    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    engine = Engine.from_checkpoint(
        args.checkpoint, device=args.device, compile=args.compile,
        speculative=args.speculative, draft_tokens=args.draft_tokens, aot=False if args.eager else None,
    )  # fmt: skip
    if engine.tokenizer is None:  # the library takes token ids; the command line has only text
        raise UserError(
            f"{args.checkpoint} has no tokenizer.json to read and write text with: copy its training data's "
            "tokenizer.json (DATA_DIR/tokenizer.json) into the checkpoint directory"
        )
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        stop=[_unescape(s) for s in args.stop or []],
        **dataclasses.asdict(sampling),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # ours, e.g. a prompt cut to fit the context, every time
        warnings.simplefilter("ignore", DeprecationWarning)  # libraries' notes (torch.compile's)
        silence_library_noise()
        warnings.showwarning = _show_warning
        if args.chat:
            _chat(engine, args, prompts, settings)
        elif len(prompts) == 1:
            _stream_one(engine, prompts[0], settings)
        else:  # in batches of --batch-size, each printed as soon as it is done
            for start in range(0, len(prompts), args.batch_size):
                _print_batch(engine, prompts[start : start + args.batch_size], start, settings)
        if args.interactive and not args.chat:  # --chat's own loop has run already
            _interactive(engine, settings)
    return 0


def _chat(engine: Any, args: Any, prompts: list[str], settings: dict[str, Any]) -> None:
    """--chat: each prompt a question of its own (streamed alone, batched when several), else a chat."""
    from deepseek_lm.checkpoint import read_chat_template, resolve_checkpoint
    from deepseek_lm.generate.chat import chat_format, chat_loop, reply

    fmt = chat_format(engine, read_chat_template(resolve_checkpoint(args.checkpoint)))
    start = [{"role": "system", "content": args.system}] if args.system else []
    if len(prompts) == 1:
        show = lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush())  # noqa: E731
        reply(engine, fmt, [*start, {"role": "user", "content": prompts[0]}], settings, stream=show)
        print(flush=True)
    for first in range(0, len(prompts) if len(prompts) > 1 else 0, args.batch_size):
        batch = prompts[first : first + args.batch_size]
        rendered = [fmt.render([*start, {"role": "user", "content": p}]) for p in batch]
        stop = [*fmt.stop, *settings["stop"]]
        outs = engine.generate(rendered, **{**settings, "stop": stop}, stop_token_ids=fmt.stop_token_ids)
        for i, (prompt, out) in enumerate(zip(batch, outs), start=first):
            print(
                f"{'' if i == 0 else chr(10)}--- [{i}] ({out.finish_reason}) ---\n> {prompt}\n{out.text.strip()}"
            )
    if not prompts or args.interactive:
        chat_loop(engine, fmt, settings, system=args.system)


def _read_prompts(prompt: list[str] | None, prompt_file: str | None) -> list[str]:
    prompts = [sys.stdin.read() if p == "-" else p for p in prompt or []]
    if prompt_file is not None:
        try:
            lines = Path(prompt_file).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as e:
            raise UserError(f"--prompt-file {prompt_file}: cannot read it ({e.strerror})") from None
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise UserError(f"--prompt-file {prompt_file}: no prompts in it (one prompt per non-empty line)")
        prompts += from_file
    return prompts


def _unescape(stop: str) -> str:
    for escaped, char in _ESCAPES.items():
        stop = stop.replace(escaped, char)
    return stop


def _stream_one(engine: Any, prompt: str, settings: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(prompt)
    out.flush()

    def show(_: int, piece: str) -> None:
        out.write(piece)
        out.flush()

    completion = engine.generate(prompt, stream=show, **settings)
    out.write("\n")
    out.flush()
    _note_context_end(engine, completion)


def _print_batch(engine: Any, prompts: list[str], first: int, settings: dict[str, Any]) -> None:
    completions = engine.generate(prompts, **settings)
    for i, (prompt, completion) in enumerate(zip(prompts, completions), start=first):
        print(f"{'' if i == 0 else chr(10)}--- [{i}] ({completion.finish_reason}) ---")
        print(prompt + completion.text, flush=True)
        _note_context_end(engine, completion)


def _interactive(engine: Any, settings: dict[str, Any]) -> None:
    print("interactive: type a prompt and press Enter; Ctrl-C stops a reply, Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            prompt = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not prompt.strip():
            continue
        try:
            _stream_one(engine, prompt, settings)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)


def _note_context_end(engine: Any, completion: Any) -> None:
    if completion.finish_reason == "context":
        print(f"[stopped at the end of the {engine.context_length}-token context]", file=sys.stderr)


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
):
    kind = "" if issubclass(category, Notice) else "warning: "  # a notice (a one-time compile) is no warning
    print(f"deepseek-lm generate: {kind}{message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# eval


def _eval_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="deepseek-lm eval",
        exit_on_error=False,
        description="Loss, perplexity and bits per byte of a checkpoint, with the xz baseline beside them. "
        "Without --data: the validation split of the data the checkpoint was trained on.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, or a run directory (its best checkpoint, else the latest)",
    )
    p.add_argument("--data", nargs="+", type=str, help="text files (.txt, .md, ..., directories, globs)")
    p.add_argument("--data-dir", type=str, help="a directory written by `prepare`: its validation split")
    p.add_argument("--seq-len", type=int | None, default=None, help="window length (default: training's)")
    p.add_argument("--batch-size", type=int | None, default=None, help="default: training's micro-batch")
    p.add_argument("--max-batches", type=int | None, default=None, help="default: the whole split")
    p.add_argument("--json", type=str | None, default=None, help="also write the results to this JSON file")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def main_eval(argv: list[str]) -> int:
    args = parse_args(_eval_parser(), argv)
    if args.data and args.data_dir:
        raise UserError("give either --data (text files) or --data-dir (a prepared split), not both")
    from deepseek_lm.checkpoint import load_checkpoint
    from deepseek_lm.generate.evaluate import EvalSettings, evaluate_checkpoint

    ckpt = load_checkpoint(args.checkpoint, device=args.device)
    settings = EvalSettings(seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.max_batches)
    report = evaluate_checkpoint(ckpt, data=args.data, data_dir=args.data_dir, settings=settings)
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0
