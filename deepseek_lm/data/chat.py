"""Chat format: OpenAI-style messages → one prompt string, through a Jinja chat template.

The template follows transformers' `apply_chat_template` contract, so that the `chat_template` written into an
exported tokenizer_config.json gives exactly our prompt, hence our ids: it sees `messages` (a list of
{"role", "content"}), `add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`,
`pad_token`), and renders in a sandboxed environment with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `tojson` that does not escape HTML and a `raise_exception(message)` global.

Two built-in templates:
- `PLAIN_CHAT_TEMPLATE`, for a model that never saw a chat: one line per turn, `Role: content`, and a last
  `Assistant:` for the reply. A pretrained model continues that as text, so an assistant turn ends where the
  model starts a new role line (`PLAIN_STOP`) or ends the document (<|endoftext|>).
- `TOKEN_CHAT_TEMPLATE`, for a model fine-tuned with role tokens (`deepseek-lm finetune` adds them to the
  tokenizer): `<|user|>content<|end|><|assistant|>...`; an assistant turn ends with the `<|end|>` token.
  No newline follows a role token: the special token already separates the turns (a newline would be one
  more token per turn that carries nothing), and the content then starts as a document does in pretraining,
  right after a special token. `<|end|>` ends a turn, `<|endoftext|>` stays the end of a document: fine-tuning
  never puts `<|endoftext|>` after a conversation (packed conversations are kept apart by the attention
  mask instead), so a reply ends with `<|end|>`, and generation stops at either (`stop_token_ids` + EOS).

A checkpoint stores its template as `chat_template.jinja` (transformers' file name); one without a template
chats through `TOKEN_CHAT_TEMPLATE` when its tokenizer has the role tokens, else `PLAIN_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from deepseek_lm.data.tokenizer import special_token_ids
from deepseek_lm.errors import UserError

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role

# fmt: off
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# the next role line, which a model that continues the plain template as text writes after its answer
PLAIN_STOP = ("\nUser:", "\nSystem:", "\nAssistant:")

SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLE_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
TOKEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# fmt: on

# tokens that end a turn in chat formats a loaded tokenizer may come with (ours first)
_END_OF_TURN_ALIASES = (END_TOKEN, "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages → [{"role", "content"}] with plain-string content, or a one-line `UserError`.

    Content may be a string or a list of text parts (`{"type": "text", "text": ...}`); `developer` is read as
    `system`. Anything else (images, tool calls, unknown roles) is refused, naming the message."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise UserError("messages must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
        if role not in ROLES:
            raise UserError(
                f"messages[{i}].role must be one of {', '.join(ROLES)} (got {message.get('role')!r})"
            )
        checked.append({"role": role, "content": _text_content(message.get("content"), i)})
    return checked


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise UserError(
        f"messages[{i}].content must be a string or a list of text parts ({{'type': 'text', 'text': ...}})"
    )


@dataclass(frozen=True)
class ChatFormat:
    """A chat template and what ends an assistant turn under it."""

    template: str
    stop: tuple[str, ...] = ()  # strings that end an assistant turn (never shown)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end an assistant turn (besides end-of-text)
    special_tokens: tuple[tuple[str, str], ...] = ()  # (name, token) the template may read: bos/eos/pad

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, template: str | None = None) -> ChatFormat:
        """The format of a checkpoint: its stored `template`, else the built-in one its tokenizer suits."""
        has_role_tokens = all(tokenizer.token_to_id(t) is not None for t in ROLE_TOKENS)
        if template is None:
            template = TOKEN_CHAT_TEMPLATE if has_role_tokens else PLAIN_CHAT_TEMPLATE
        end_ids = tuple(
            i for t in _END_OF_TURN_ALIASES if t in template and (i := tokenizer.token_to_id(t)) is not None
        )
        ids = special_token_ids(tokenizer)
        names = {"bos_token": ids["bos"], "eos_token": ids["eot"], "pad_token": ids["pad"]}
        special = tuple((k, tokenizer.id_to_token(v)) for k, v in names.items() if v is not None)
        stop = PLAIN_STOP if template == PLAIN_CHAT_TEMPLATE else ()
        return cls(template, stop, end_ids, special)

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` (checked by `check_messages`), ending with the assistant's cue."""
        return self._render(check_messages(messages), add_generation_prompt)

    def encode(self, tokenizer: Any, messages: Any) -> tuple[list[int], list[bool]]:
        """A whole conversation's token ids, and which of them an assistant wrote: each assistant turn's
        content and what ends it (the end token; the newline under the plain template), never the role tokens
        or the other turns. Fine-tuning puts its loss on exactly these.

        An assistant turn is the text between the conversation rendered up to it with the generation prompt
        and rendered through it, so any template that renders turn by turn works (a template that rewrites
        earlier turns is refused); a token belongs to the turn its first character falls in."""
        messages = check_messages(messages)
        text = self._render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise UserError(
                    "the chat template does not render a conversation turn by turn (an earlier turn changes "
                    "when a later one is added), so the assistant's tokens cannot be told apart"
                )
            spans.append((len(before), len(through)))
        encoding = tokenizer.encode(text, add_special_tokens=False)
        mask = [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
        return list(encoding.ids), mask

    def user_turn_ids(self, tokenizer: Any) -> tuple[int, ...]:
        """The special token that opens a user message under this template and no other message, as a
        tuple; empty where a user message opens with text (the plain template) or a token other roles share.
        The serving engine starts a prefill chunk before it (generate/chunking.py)."""

        def first(role: str) -> int | None:
            text = self._render([{"role": role, "content": "x"}], add_generation_prompt=False)
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            return ids[0] if ids else None

        user = first("user")
        added = tokenizer.get_added_tokens_decoder().get(user)  # id -> AddedToken
        if added is None or not added.special or user in (first("system"), first("assistant")):
            return ()
        return (user,)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return _compile(self.template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **dict(self.special_tokens)
            )
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template failed on these messages: {e}") from None


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """The template compiled in an environment like transformers' (see the module docstring)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
