"""Chatting with a checkpoint (`deepseek-lm generate --chat`): the conversation so far rendered through the
checkpoint's chat template (data/chat.py), each reply generated until the template's end of turn.

A fine-tuned checkpoint ends a reply with its `<|end|>` token (`ChatFormat.stop_token_ids`, passed to the
engine as extra end-of-sequence tokens); a base model under the plain template ends where it starts a new
role line (`ChatFormat.stop`, stop strings). The oldest exchanges are dropped (a system message stays) when
the history no longer fits the context with room for the reply.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.generate.engine import Completion, Engine


def chat_format(engine: Engine, template: str | None) -> ChatFormat:
    """The checkpoint's chat format: its stored template, else the built-in one its tokenizer suits."""
    return ChatFormat.for_tokenizer(engine.tokenizer, template)


def reply(
    engine: Engine,
    fmt: ChatFormat,
    messages: list[dict[str, str]],
    settings: dict[str, Any],
    stream: Callable[[int, str], None] | None = None,
) -> Completion:
    """The assistant's next turn after `messages`. `settings`: `Engine.generate`'s keywords (its `stop`
    strings join the template's)."""
    settings = dict(settings)
    stop = [*fmt.stop, *(settings.pop("stop", None) or [])]
    prompt = fit_history(engine, fmt, messages, settings.get("max_new_tokens", 128))
    return engine.generate(prompt, stop=stop, stop_token_ids=fmt.stop_token_ids, stream=stream, **settings)


def fit_history(engine: Engine, fmt: ChatFormat, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """The prompt for `messages`, without the oldest exchanges that do not fit the context beside the reply."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    prompt = fmt.render(system + turns)
    room = engine.context_length - max_new_tokens
    while len(engine.encode(prompt)) > room and len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # an exchange starts with the user
            turns = turns[1:]
        prompt = fmt.render(system + turns)
    return prompt  # still too long: the engine keeps its end, with a warning


def chat_loop(
    engine: Engine,
    fmt: ChatFormat,
    settings: dict[str, Any],
    system: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> list[dict[str, str]]:
    """A terminal chat: a line from the user, the reply streamed; Ctrl-C stops a reply (its text so far
    stays in the history), Ctrl-D quits, /reset forgets the history. Returns the conversation."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(
        "chat: type a message and press Enter; Ctrl-C stops a reply, /reset forgets, Ctrl-D quits",
        file=sys.stderr,
    )
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=sys.stderr)
            return messages
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": _say(engine, fmt, messages, settings, out)})


def _say(engine: Engine, fmt: ChatFormat, messages: list[dict[str, str]], settings: dict, out: TextIO) -> str:
    """Stream the reply to `out`; Ctrl-C ends it early. Returns what was said."""
    pieces: list[str] = []

    def show(_: int, piece: str) -> None:
        pieces.append(piece)
        out.write(piece)
        out.flush()

    try:
        reply(engine, fmt, messages, settings, stream=show)
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()
