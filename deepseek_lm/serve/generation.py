"""One generation request of the API: its prompts submitted to the engine (one engine request per choice),
then their events collected into one JSON response or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import sys
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deepseek_lm.errors import UserError
from deepseek_lm.generate.batching import BatchEngine, Event, Params, QueueFullError
from deepseek_lm.generate.grammar import Grammars
from deepseek_lm.generate.logits_processing import Processing, TokenLogprobs
from deepseek_lm.generate.sampling import SamplingConfig
from deepseek_lm.serve import protocol as P
from deepseek_lm.serve.logprobs import LogprobsWriter
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
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # the generated tokens'
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.. (echo with logprobs)
    text_offset: int = 0  # a completions stream's text sent so far (logprobs' text_offset)


class Completions:
    """The /v1/completions and /v1/chat/completions requests of one server."""

    def __init__(self, engine: BatchEngine, model_name: str, metrics: Metrics, chat_format: Any) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.chat_format = chat_format
        self.created = P.now()
        vocab = engine.model.config.vocab_size
        self.grammars = Grammars(engine.tokenizer, vocab_size=vocab, eos_token_id=engine.eos_token_id)
        self.logprobs = LogprobsWriter(engine.tokenizer)

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
        params = self._params(body, prompts, kind)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        choices = self._submit(prompts, params, body, loop, events, arrival)
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

    def _params(self, body: Any, prompts: list[list[int]], kind: P.Kind) -> Params:
        """The engine's settings for the request, every value checked (a 400 naming the parameter)."""
        longest = max(len(p) for p in prompts)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:  # chat without a limit: up to the end of the context
            max_tokens = max(self.engine.context_length - longest, 1)
        if max_tokens == 0 and not getattr(body, "echo", False):
            raise bad_request(
                "max_tokens 0 generates nothing: it needs echo (the prompt, scored)", "max_tokens"
            )
        logprobs, prompt_logprobs = body.logprob_counts()
        try:
            top_k = body.top_k if body.top_k and body.top_k > 0 else None
            sampling = SamplingConfig(temperature=body.temperature, top_k=top_k, top_p=body.top_p)
        except UserError as e:
            raise bad_request(str(e)) from None
        stop, stop_ids = body.stop_strings(), ()
        if kind == "chat":  # what ends an assistant turn in this chat format
            stop += [s for s in self.chat_format.stop if s not in stop]
            stop_ids = self.chat_format.stop_token_ids
        params = Params(
            max_tokens=max_tokens, sampling=sampling, seed=body.seed, stop=stop, stop_token_ids=stop_ids,
            processing=self._processing(body), grammar=self._grammar(body), logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )  # fmt: skip
        try:
            self.engine.check(longest, max_tokens, params)
        except UserError as e:
            param = "max_tokens" if "max_tokens" in str(e) else None
            raise bad_request(str(e), param) from None
        return params

    def _processing(self, body: Any) -> Processing:
        vocab, bias = self.engine.model.config.vocab_size, {}
        for key, value in (body.logit_bias or {}).items():
            token = int(key) if re.fullmatch(r"\s*-?[0-9]{1,10}\s*", key) else None  # ASCII digits only
            if token is None or not 0 <= token < vocab:
                raise bad_request(
                    f"logit_bias keys must be token ids in [0, {vocab}) written as strings, got {key[:40]!r}",
                    "logit_bias",
                )
            bias[token] = min(max(value, -P.MAX_BIAS), P.MAX_BIAS)  # clamped, as OpenAI and vLLM do
        return Processing(
            presence=body.presence_penalty, frequency=body.frequency_penalty,
            repetition=body.repetition_penalty, bias=bias,
        )  # fmt: skip

    def _grammar(self, body: Any) -> Any:
        if (constraint := body.constraint()) is None:
            return None
        kind, value = constraint
        param = "structured_outputs" if body.structured_outputs is not None else "response_format"
        try:
            return dict(
                json_schema=self.grammars.json_schema, regex=self.grammars.regex, grammar=self.grammars.lark,
                choice=self.grammars.choice,
            )[kind](value)  # fmt: skip
        except UserError as e:
            raise bad_request(str(e), param) from None

    def _submit(self, prompts, params: Params, body: Any, loop, events, arrival: float) -> list[_Choice]:
        """One engine request per prompt and choice, queued all together or not at all."""
        n, choices, items = body.n, [], []
        for p, ids in enumerate(prompts):
            for j in range(n):
                choice = _Choice(index=p * n + j)
                # choice i draws from seed + i: n samples differ, and a seed reproduces each of them
                seed = None if params.seed is None else params.seed + choice.index
                items.append((ids, _with_seed(params, seed), self._sink(loop, events, choice, arrival)))
                choices.append(choice)
        try:
            requests = self.engine.submit_all(items)
        except UserError as e:  # more than the server ever holds: waiting would not help
            what = f"{len(prompts)} prompt(s) × n={n}"
            raise bad_request(f"{what}: {e}; send fewer prompts or choices per request", "prompt") from None
        except QueueFullError as e:
            raise APIError(503, f"the server is busy: {e}; retry in a moment", "server_overloaded") from None
        for choice, request in zip(choices, requests):
            choice.request = request
        return choices

    def _sink(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, choice: _Choice, arrival: float):
        """Called in the engine's thread with each event: metrics first (whether or not the client still
        listens), then the event to this request's queue in the event loop."""

        def put(event: Event) -> None:
            try:
                self._observe(choice, event, arrival)
            except Exception:  # a metric is not worth an answer: the event goes out whatever happens here
                traceback.print_exc(file=sys.stderr)
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
        self.with_logprobs = body.logprob_counts()[0] is not None

    async def _next(self) -> tuple[_Choice, Event]:
        index, event = await self.events.get()
        choice = self.choices[index]
        if event.finish_reason is not None:
            choice.finish_reason, choice.error = event.finish_reason, event.error
        if event.logprobs:
            choice.logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            choice.prompt_logprobs = event.prompt_logprobs
        return choice, event

    def _pending(self) -> bool:
        return any(c.finish_reason is None for c in self.choices)

    def _usage(self) -> dict:  # each prompt counted once however many choices it has, as OpenAI does
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.request.completion_tokens for c in self.choices)
        if not self.server.engine.draft_tokens:
            cached = None
            if self.server.engine.prefix_cache is not None:  # each prompt once: its first choice's
                cached = sum(c.request.cached_tokens for c in self.choices[:: self.body.n])
            return P.usage(prompt, completion, cached=cached)
        drafted, accepted = (
            sum(getattr(c.request, k) for c in self.choices) for k in ("drafted", "accepted")
        )
        return P.usage(prompt, completion, drafted, accepted)

    def _prompt_ids(self, choice: _Choice) -> list[int]:
        return self.prompts[choice.index // self.body.n]

    def _echo(self, choice: _Choice) -> str:
        if self.kind == "chat" or not self.body.echo:
            return ""
        return self.server.engine.tokenizer.decode(self._prompt_ids(choice))

    def _failure(self) -> _Choice | None:
        return next((c for c in self.choices if c.finish_reason in ("error", "cancelled")), None)

    def _failure_error(self, choice: _Choice) -> APIError:
        """A choice that did not finish: the server stopping (503) or a fault inside it (500)."""
        message = f"generation stopped: {choice.error or choice.finish_reason}"
        return APIError(503 if self.server.engine.closing else 500, message, "server_error")

    def _logprobs(self, choice: _Choice, tokens: list[TokenLogprobs], offset: int, echo: bool) -> Any:
        """The choice's logprobs field for these generated tokens (with the prompt's first, with echo)."""
        if not self.with_logprobs:
            return None
        writer = self.server.logprobs
        if self.kind == "chat":
            return {"content": writer.chat(tokens)}
        entries = [(lp.token, lp) for lp in tokens]
        if echo:
            prompt = self._prompt_ids(choice)
            entries = [(prompt[0], None), *((lp.token, lp) for lp in choice.prompt_logprobs or ()), *entries]
        return writer.completion(entries, offset)

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
            raise self._failure_error(failed)
        return JSONResponse(self._response())

    async def _cancel_on_disconnect(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        for c in self.choices:
            c.request.cancel()

    def _response(self) -> dict:
        choices = []
        for c in self.choices:
            echo = self._echo(c)
            reason = P.FINISH_REASONS[c.finish_reason]
            logprobs = self._logprobs(c, c.logprobs, 0, bool(echo))
            if self.kind == "chat":
                message = {"role": "assistant", "content": "".join(c.text)}
                choices.append(dict(index=c.index, message=message, logprobs=logprobs, finish_reason=reason))
            else:
                text = echo + "".join(c.text)
                choices.append(dict(index=c.index, text=text, logprobs=logprobs, finish_reason=reason))
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return dict(
            id=self.id, object=obj, created=self.created, model=self.server.model_name, choices=choices,
            usage=self._usage(),
        )  # fmt: skip

    # streaming --------------------------------------------------------------------------------------------

    def _chunk(
        self, choice: _Choice, text: str | None, finish: str | None, role: bool = False, logprobs: Any = None
    ) -> str:
        if self.kind == "chat":
            delta = (
                {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            )
            item = dict(index=choice.index, delta=delta, logprobs=logprobs, finish_reason=finish)
            obj = "chat.completion.chunk"
        else:
            item = dict(index=choice.index, text=text or "", logprobs=logprobs, finish_reason=finish)
            obj = "text_completion"
        chunk = dict(
            id=self.id, object=obj, created=self.created, model=self.server.model_name, choices=[item]
        )
        if self._include_usage():
            chunk["usage"] = None
        return _sse(chunk)

    def _include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    def _event_chunk(self, choice: _Choice, event: Event) -> str | None:
        """The chunk for one event (None when it carries nothing to send). The echoed prompt (completions)
        goes out with the choice's first event, scored when it was."""
        echo = ""
        if self.kind != "chat" and self.body.echo and choice.text_offset == 0 and not choice.text:
            echo = self._echo(choice)
        text = echo + event.text
        logprobs = None
        if self.with_logprobs and (event.token_ids or echo):
            logprobs = self._logprobs(choice, event.logprobs or [], choice.text_offset, bool(echo))
        choice.text.append(text)
        choice.text_offset += len(text)
        reason = None if event.finish_reason is None else P.FINISH_REASONS[event.finish_reason]
        if not (text or logprobs or reason):
            return None
        return self._chunk(choice, text if text or self.kind != "chat" else None, reason, logprobs=logprobs)

    async def sse(self) -> AsyncIterator[str]:
        try:
            if self.kind == "chat":
                for c in self.choices:
                    yield self._chunk(c, None, None, role=True)
            while self._pending():
                choice, event = await self._next()
                if event.finish_reason in ("error", "cancelled"):
                    yield _sse(self._failure_error(choice).body)
                    break
                if (chunk := self._event_chunk(choice, event)) is not None:
                    yield chunk
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
