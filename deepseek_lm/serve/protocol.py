"""The OpenAI shapes: the requests the server accepts (pydantic), the pieces of its responses, its errors.

Fields follow OpenAI's API reference, with vLLM's extensions where a client may send them (`top_k`,
`repetition_penalty`, `structured_outputs`). Every value is checked here, before anything reaches the
engine: ranges (a `seed` fits the generator's 64 bits), and text that cannot be encoded (a lone surrogate
escape such as "\\ud800" anywhere in the body is a 400, not a tokenizer crash). Parameters that would change
what a client gets and that this server does not implement (tools, `suffix`, `best_of` > n) are refused
with a 400 naming them rather than silently ignored; unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from deepseek_lm.generate.logits_processing import MAX_LOGPROBS

MAX_N = 16  # choices per request
RETRY_AFTER_S = 1  # what a 429 / 503 asks the client to wait
MAX_STOP = 16  # stop strings per request
# seeds are signed 64-bit integers (vLLM's range): seed + choice index still fits the generator's 64 bits
INT64 = 2**63
MAX_BIAS = 100.0  # |logit_bias| values, as OpenAI


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (no constraint), any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema: {'name', 'schema'}")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)
    choice: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "grammar", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, grammar, choice")
        return self


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the one model served
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension: None, 0 or -1 = all tokens
    seed: int | None = Field(None, ge=-INT64, lt=INT64)  # the generator takes 64 bits
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)  # extension, as vLLM: 1 = off
    # token id (as a string) -> bias; values clamped to ±100
    logit_bias: dict[str, Annotated[float, Field(allow_inf_nan=False)]] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # extension, as vLLM
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        if (where := unencodable(data)) is not None:
            raise ValueError(
                f"{where or 'the body'} holds a lone surrogate escape (\\ud800-\\udfff), which is not text: "
                "send characters outside the BMP as a surrogate pair or unescaped"
            )
        return data

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first parameter set to something this server does not do, or None."""
        return None

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token); None: not asked for."""
        return None, None

    def constraint(self) -> tuple[str, Any] | None:
        """The structured-output constraint: ("json_schema" | "regex" | "grammar" | "choice", its value)."""
        if self.structured_outputs is not None:
            s = self.structured_outputs
            if s.json_ is not None:
                return "json_schema", s.json_
            return next(
                (k, getattr(s, k)) for k in ("regex", "grammar", "choice") if getattr(s, k) is not None
            )
        f = self.response_format
        if f is None or f.type == "text":
            return None
        return (
            ("json_schema", f.json_schema.schema_)
            if f.type == "json_schema"
            else ("json_schema", {"type": "object"})
        )


class CompletionRequest(_Sampling):
    # one prompt (text or token ids) or a batch of them
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return super().unsupported()

    def logprob_counts(self) -> tuple[int | None, int | None]:
        scored = self.logprobs if self.echo else None
        if self.echo and self.max_tokens == 0 and scored is None:
            scored = 0  # the prompt is all there is: scored (and the scores left out of the response)
        return self.logprobs, scored


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the context
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        return super().unsupported()

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None


def unencodable(value: Any, path: str = "") -> str | None:
    """The path (e.g. "messages.0.content") of the first string in a parsed JSON value, key or value, that
    UTF-8 cannot encode (a lone surrogate), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        here = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and unencodable(key) is not None:
            return here
        if (found := unencodable(item, here)) is not None:
            return found
    return None


# responses --------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    drafted: int | None = None,
    accepted: int = 0,
    cached: int | None = None,
) -> dict:
    """OpenAI's usage, with `prompt_tokens_details.cached_tokens` (prompt tokens the prefix cache served)
    when the server caches prefixes; a speculative server's (drafted not None) adds the extension
    `speculative`: draft tokens verified, of them accepted, and their ratio (null before any round)."""
    out: dict = dict(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    if cached is not None:
        out["prompt_tokens_details"] = dict(cached_tokens=cached)
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
