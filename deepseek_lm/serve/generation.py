"""One generation request of the API: its prompts submitted to the engine (one engine request per choice),
then their events collected into one JSON response or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deepseek_lm.errors import UserError
from deepseek_lm.generate.batching import BatchEngine, Event, Params, QueueFullError
from deepseek_lm.generate.sampling import SamplingConfig
from deepseek_lm.serve import protocol as P
from deepseek_lm.serve.metrics import Metrics
from deepseek_lm.serve.protocol import APIError, bad_request


@dataclass
class _Choice:
    """One engine request of an HTTP request: choice `index` of prompt `prompt_index`."""

    index: int
    request: Any = None
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    last_time: float | None = None


class Completions:
    """The /v1/completions and /v1/chat/completions requests of one server."""

    def __init__(self, engine: BatchEngine, model_name: str, metrics: Metrics, chat_format: Any) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.chat_format = chat_format
        self.created = P.now()

    def model_card(self) -> dict:
        card = dict(
            id=self.model_name,
            object="model",
            created=self.created,
            owned_by="deepseek-lm",
            max_model_len=self.engine.context_length,
        )
        if self.engine.draft_tokens:  # an extension: the page shows acceptance rates when it is there
            card["speculative"] = dict(draft_tokens=self.engine.draft_tokens)
        return card

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                "invalid_request_error", "model", "model_not_found",
            )  # fmt: skip

    # one request ---------------------------------------------------------------------------------------------

    async def generate(self, body: Any, request: Request, kind: P.Kind) -> Response:
        arrival = time.monotonic()
        self.check_model(body.model)
        if (name := body.unsupported()) is not None:
            raise bad_request(f"{name} is not supported by this server; leave it out", name, "unsupported")
        prompts = self._prompts(body, kind)
        params = self._params(body, prompts)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        choices = self._submit(prompts, params, body.n, loop, events, arrival)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * body.n)
        response_id = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
        stream = _Stream(self, body, kind, response_id, prompts, choices, events, arrival)
        if body.stream:
            return StreamingResponse(
                stream.sse(), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )  # fmt: skip
        return await stream.collect(request)

    def _prompts(self, body: Any, kind: P.Kind) -> list[list[int]]:
        """The request's prompts as token ids."""
        if kind == "chat":
            if self.chat_format is None:
                raise bad_request("this server has no chat format: use /v1/completions", "messages")
            try:
                return [self.engine.encode(self.chat_format.render([m.model_dump() for m in body.messages]))]
            except UserError as e:
                raise bad_request(str(e), "messages") from None
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt is empty: give a string, a list of strings or token ids", "prompt")
        vocab = self.engine.model.config.vocab_size
        out = []
        for p in prompt:
            ids = self.engine.encode(p) if isinstance(p, str) else list(p)
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
            out.append(ids)
        return out

    def _params(self, body: Any, prompts: list[list[int]]) -> Params:
        longest = max(len(p) for p in prompts)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:  # chat without a limit: up to the end of the context
            max_tokens = max(self.engine.context_length - longest, 1)
        try:
            self.engine.check(longest, max_tokens)
            top_k = body.top_k if body.top_k and body.top_k > 0 else None
            sampling = SamplingConfig(temperature=body.temperature, top_k=top_k, top_p=body.top_p)
        except UserError as e:
            param = "max_tokens" if "max_tokens" in str(e) else None
            raise bad_request(str(e), param) from None
        stop, stop_ids = body.stop_strings(), ()
        if getattr(body, "messages", None) is not None:  # what ends an assistant turn in this chat format
            stop += [s for s in self.chat_format.stop if s not in stop]
            stop_ids = self.chat_format.stop_token_ids
        return Params(
            max_tokens=max_tokens, sampling=sampling, seed=body.seed, stop=stop, stop_token_ids=stop_ids
        )

    def _submit(self, prompts, params: Params, n: int, loop, events, arrival: float) -> list[_Choice]:
        choices = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(n):
                    choice = _Choice(index=p * n + j)
                    # choice i draws from seed + i: n samples differ, and a seed reproduces each of them
                    seed = None if params.seed is None else params.seed + choice.index
                    sink = self._sink(loop, events, choice, arrival)
                    choice.request = self.engine.submit(ids, _with_seed(params, seed), sink)
                    choices.append(choice)
        except QueueFullError as e:
            for c in choices:
                c.request.cancel()
            raise APIError(503, f"the server is busy: {e}; retry in a moment", "server_overloaded") from None
        return choices

    def _sink(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, choice: _Choice, arrival: float):
        """Called in the engine's thread with each event: metrics first (whether or not the client still
        listens), then the event to this request's queue in the event loop."""

        def put(event: Event) -> None:
            self._observe(choice, event, arrival)
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens any more
                loop.call_soon_threadsafe(events.put_nowait, (choice.index, event))

        return put

    def _observe(self, choice: _Choice, event: Event, arrival: float) -> None:
        if event.token_ids:
            self.metrics.generation_tokens.inc(len(event.token_ids))
            if choice.last_time is None:
                self.metrics.ttft.observe(event.time - arrival)
            else:
                self.metrics.token_latency.observe(event.time - choice.last_time)
            choice.last_time = event.time
        if event.drafted:
            self.metrics.draft_tokens.inc(event.drafted)
            self.metrics.accepted_draft_tokens.inc(event.accepted)
        if event.finish_reason is not None:
            self.metrics.finished.labels(event.finish_reason).inc()


def _with_seed(params: Params, seed: int | None) -> Params:
    return dataclasses.replace(params, seed=seed)


class _Stream:
    """The events of one HTTP request's choices, as server-sent events or one JSON response."""

    def __init__(
        self, server: Completions, body, kind: P.Kind, response_id, prompts, choices, events, arrival
    ):
        self.server, self.body, self.kind, self.id = server, body, kind, response_id
        self.prompts, self.choices, self.events, self.arrival = prompts, choices, events, arrival
        self.created = P.now()

    async def _next(self) -> tuple[_Choice, Event]:
        index, event = await self.events.get()
        choice = self.choices[index]
        if event.finish_reason is not None:
            choice.finish_reason, choice.error = event.finish_reason, event.error
        return choice, event

    def _pending(self) -> bool:
        return any(c.finish_reason is None for c in self.choices)

    def _usage(self) -> dict:  # each prompt counted once however many choices it has, as OpenAI does
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.request.completion_tokens for c in self.choices)
        if not self.server.engine.draft_tokens:
            return P.usage(prompt, completion)
        drafted, accepted = (
            sum(getattr(c.request, k) for c in self.choices) for k in ("drafted", "accepted")
        )
        return P.usage(prompt, completion, drafted, accepted)

    def _echo(self, choice: _Choice) -> str:
        if self.kind == "chat" or not self.body.echo:
            return ""
        return self.server.engine.tokenizer.decode(self.prompts[choice.index // self.body.n])

    def _failure(self) -> _Choice | None:
        return next((c for c in self.choices if c.finish_reason in ("error", "cancelled")), None)

    # non-streaming ----------------------------------------------------------------------------------------

    async def collect(self, request: Request) -> JSONResponse:
        watcher = asyncio.create_task(self._cancel_on_disconnect(request))
        try:
            while self._pending():
                choice, event = await self._next()
                choice.text.append(event.text)
        finally:
            watcher.cancel()
            for c in self.choices:
                c.request.cancel()
        if (failed := self._failure()) is not None:
            raise APIError(503, f"generation stopped: {failed.error or failed.finish_reason}", "server_error")
        return JSONResponse(self._response())

    async def _cancel_on_disconnect(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        for c in self.choices:
            c.request.cancel()

    def _response(self) -> dict:
        choices = []
        for c in self.choices:
            text = self._echo(c) + "".join(c.text)
            reason = P.FINISH_REASONS[c.finish_reason]
            if self.kind == "chat":
                message = {"role": "assistant", "content": text}
                choices.append(dict(index=c.index, message=message, logprobs=None, finish_reason=reason))
            else:
                choices.append(dict(index=c.index, text=text, logprobs=None, finish_reason=reason))
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return dict(
            id=self.id, object=obj, created=self.created, model=self.server.model_name, choices=choices,
            usage=self._usage(),
        )  # fmt: skip

    # streaming --------------------------------------------------------------------------------------------

    def _chunk(self, choice: _Choice | None, text: str | None, finish: str | None, role: bool = False) -> str:
        if self.kind == "chat":
            delta = (
                {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            )
            item = dict(index=choice.index, delta=delta, logprobs=None, finish_reason=finish)
            obj = "chat.completion.chunk"
        else:
            item = dict(index=choice.index, text=text or "", logprobs=None, finish_reason=finish)
            obj = "text_completion"
        chunk = dict(
            id=self.id, object=obj, created=self.created, model=self.server.model_name, choices=[item]
        )
        if self._include_usage():
            chunk["usage"] = None
        return _sse(chunk)

    def _include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    async def sse(self) -> AsyncIterator[str]:
        try:
            for c in self.choices:
                if self.kind == "chat":
                    yield self._chunk(c, None, None, role=True)
                elif echo := self._echo(c):
                    yield self._chunk(c, echo, None)
            while self._pending():
                choice, event = await self._next()
                if event.finish_reason in ("error", "cancelled"):
                    message = f"generation stopped: {event.error or event.finish_reason}"
                    yield _sse(P.error_body(message, "server_error"))
                    break
                if event.text:
                    yield self._chunk(choice, event.text, None)
                if event.finish_reason is not None:
                    yield self._chunk(
                        choice, None if self.kind == "chat" else "", P.FINISH_REASONS[event.finish_reason]
                    )
            if self._include_usage() and self._failure() is None:
                obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
                yield _sse(dict(id=self.id, object=obj, created=self.created, model=self.server.model_name,
                                choices=[], usage=self._usage()))  # fmt: skip
            yield "data: [DONE]\n\n"
        finally:  # the client left (the task is cancelled) or all is sent: free the slots now
            for c in self.choices:
                c.request.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
