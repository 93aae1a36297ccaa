"""The OpenAI shapes: the requests the server accepts (pydantic), the pieces of its responses, its errors.

Fields follow OpenAI's API reference; `top_k` is an extension (as in vLLM). Parameters that would change
what a client gets and that this server does not implement (logprobs, penalties, logit_bias, tools, ...)
are refused with a 400 naming them rather than silently ignored; unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

MAX_N = 16  # choices per request
RETRY_AFTER_S = 1  # what a 429 / 503 asks the client to wait
MAX_STOP = 16  # stop strings per request


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the one model served
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension: None, 0 or -1 = all tokens
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted at the value that means "off"; anything else is refused (`unsupported`)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first parameter set to something this server does not do, or None."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        return None


class CompletionRequest(_Sampling):
    # one prompt (text or token ids) or a batch of them
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return super().unsupported()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the context
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return super().unsupported()


# responses --------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, drafted: int | None = None, accepted: int = 0) -> dict:
    """OpenAI's usage; a speculative server's (drafted not None) adds the extension `speculative`: draft
    tokens verified, of them accepted, and their ratio (null before any round)."""
    out: dict = dict(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    if drafted is not None:
        rate = round(accepted / drafted, 4) if drafted else None
        out["speculative"] = dict(drafted_tokens=drafted, accepted_tokens=accepted, acceptance_rate=rate)
    return out


# the engine's finish reasons in OpenAI's two words
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


Kind = Literal["completion", "chat"]


class APIError(HTTPException):
    """An OpenAI-shaped error response."""

    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(status, message)
        self.body = error_body(message, type_, param, code)
        self.headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)
