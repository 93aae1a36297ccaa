"""Continuous batching: one decode loop that owns the model, over fixed cache slots that requests join and
leave at step boundaries (what `deepseek-lm serve` runs; SPEC §10).

    engine = BatchEngine(model, tokenizer, max_batch_size=8)
    engine.start()
    request = engine.submit(engine.encode("Once upon"), Params(max_tokens=32, seed=0))
    for event in request.events():
        print(event.text, end="")
    engine.close()

Each iteration of the loop (a thread):
1. drops cancelled requests (a client that left) and admits waiting ones while slots are free;
2. prefills at most one chunk budget of prompt tokens (`prefill_chunk`), one request at a time, into a
   one-row staging cache; a prompt is cut into chunks by its own tokens (chunking.py: at most
   `prefill_chunk` tokens, and a chunk starts at each user turn of a chat), so its numbers never depend
   on what else is queued. A finished prompt samples its first token and its cache row is copied into
   the next free slot; with nothing left to prefill, a chat turn that just ended is prefilled into the
   prefix cache as the conversation's next prompt will start (`_prefill_ahead`);
3. runs one decode step over the occupied slots, which sit at the front of the cache (a leaving row's slot
   is filled with the last row's), and samples every row's next token with that request's own settings
   and `torch.Generator`.
Running streams therefore wait at most one prefill chunk (~40 ms of a 2-core CPU at 256 tokens, seed
preset) per new prompt.

Decode steps, by default on a CPU in fp32 (`aot`), run through libraries compiled ahead of time
(model/aot.py: one for a single row, one for every batch size from 2 rows, steps attending to the
positions in use): ~7× the eager batch-invariant decoder's tokens/s at one client, ~3× at 4, ~1.6× at 16
(demo, one thread). Their products pick kernels by the number of rows, so a row's logits can move in the last bits
with the batch beside it, and a greedy token where two logits tie that closely.

`aot=False` (`serve --batch-invariant`) keeps a request's output its own: the decoder is built once (again
only when the model's weights changed while nothing was decoding: `_follow_weights`), batch-invariant
(model/decode.py: a row's logits are bitwise the same whatever rows share the step and whatever attended
length), a step attends to a length rounded up to the decoder's attention slice, and sampling reads only
the row's logits and generator. So greedy output, and sampled output with a `seed`, is the same alone or in
a full batch (tests/test_batching.py). `compile=True` gives it up too: compiled kernels are picked per batch
shape (rows rounded up to a power of 2, the whole context attended).

Each row's logits pass through its request's processing (logits_processing.py: logit bias, penalties, a
structured-output grammar's mask) before sampling; log-probabilities are read off the model's logits. A
prompt's leading chunks may come from the prefix cache (prefix_cache.py), bitwise what its prefill
computes. Every request is answered: a fault in one request's work fails that request alone (`_guarded`).

`SpeculativeBatchEngine` (speculative_batching.py) runs the same loop with speculative rounds instead of
one-token steps, through the hooks below (`_build`, `_warm_up`, `_prefill_chunk`, `_join`, `_decode_step`,
`_move_row`, `_attended`).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepseek_lm.data.tokenizer import special_token_ids
from deepseek_lm.errors import UserError
from deepseek_lm.generate.chunking import chunk_ends
from deepseek_lm.generate.logits_processing import (
    Processing,
    RowProcessor,
    TokenLogprobs,
    log_softmax,
    token_logprobs,
)
from deepseek_lm.generate.prefix_cache import PrefixCache, chunk_keys
from deepseek_lm.generate.sampling import SamplingConfig, argmax, make_generator, sample
from deepseek_lm.generate.streaming import TextStream
from deepseek_lm.model.aot import AOTDecoder, CompiledPrefill, default_on, library_batch
from deepseek_lm.model.decode import _KV_CHUNK, Decoder, weights_stamp
from deepseek_lm.model.prefill import Prefill, fill


class QueueFullError(Exception):
    """Every slot is busy and `max_queue` requests already wait."""


@dataclass
class Params:
    """One request's generation settings."""

    max_tokens: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None  # None: a generator seeded from OS entropy
    stop: Sequence[str] = ()  # stop strings: the text ends before the first one
    stop_token_ids: Sequence[int] = ()  # tokens that end the request as end-of-text does (a chat turn's end)
    output_logits: bool = False  # each event carries the logits its token was drawn from
    processing: Processing = field(default_factory=Processing)  # penalties and logit bias
    grammar: Any = None  # structured output: a `grammar.Grammar`, whose matcher masks every step
    logprobs: int | None = None  # each event carries its tokens' log-probabilities and this many alternatives
    # the first event carries every prompt token's (after the first), with this many alternatives; then
    # max_tokens may be 0: the prompt is scored and nothing generated
    prompt_logprobs: int | None = None


@dataclass
class Event:
    """What a request produces: one per generated token (text may be '' while a character or a possible
    stop string is held back), the last one with `finish_reason`."""

    text: str
    token_ids: list[int]
    time: float  # time.monotonic() when produced
    # set on the last event: "eos" (end-of-text or a stop token) | "stop" (a stop string) | "length"
    # (max_tokens) | "context" (the end of the context) | "cancelled" | "error" (then `error` says why)
    finish_reason: str | None = None
    error: str | None = None
    logits: torch.Tensor | None = None  # (V,) fp32, with Params.output_logits
    logprobs: list[TokenLogprobs] | None = None  # one per token id, with Params.logprobs
    # prompt tokens 1.. (each given the ones before), on the first event, with Params.prompt_logprobs
    prompt_logprobs: list[TokenLogprobs] | None = None
    # speculative engines, on the first event of each round of the request: drafts verified, of them accepted
    drafted: int = 0
    accepted: int = 0


class Request:
    """A submitted prompt. `events()` yields its `Event`s (unless a `sink` took them); `cancel()` frees its
    slot at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: Params, sink: Callable[[Event], None] | None) -> None:
        self.id = next(Request._ids)
        self.prompt_ids, self.params = prompt_ids, params
        self.created = time.monotonic()
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens whose latents came from the prefix cache
        self.drafted = self.accepted = 0  # draft tokens verified and accepted (speculative engines)
        self.finish_reason: str | None = None
        self._queue: queue.SimpleQueue[Event] | None = None if sink else queue.SimpleQueue()
        self._sink = sink or self._queue.put
        self._cancelled = False
        # the loop's state: the prompt's chunk ends (chunking.py; None until planned) and their prefix cache
        # keys, tokens prefilled, the tokens generated, the next token to feed and its position
        self._cuts: list[int] | None = None
        self._keys: list[bytes] | None = None
        self._prefilled = 0
        self._answer: list[int] = []
        self._next_id = 0
        self._pos = 0
        self._generator: torch.Generator | None = None
        self._stream: TextStream | None = None
        self._processor: RowProcessor | None = None
        self._prompt_logprobs: list[TokenLogprobs] | None = None  # computed by the prefill, sent first
        # a speculative engine's: the next round's drafts (D,) and their distributions (D, V) (None: greedy),
        # and the prefilled states whose MTP pairs wait for their next token (1, k, D)
        self._drafts: torch.Tensor | None = None
        self._q: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self._cancelled = True

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        if self._queue is None:
            raise RuntimeError("this request's events go to its sink")
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return


class BatchEngine:
    """Requests decoded together over `max_batch_size` cache slots of `context_length` positions."""

    draft_tokens = 0  # tokens drafted per row and round: 0, one token per step (SpeculativeBatchEngine: D)
    # a prompt equal to the one just prefilled starts from the staging cache (`_repeat`); the speculative
    # engine's staged state (its MTP pairs) is the request's own, so it prefills every prompt
    repeats_staged = True
    _staged: tuple[list[int], torch.Tensor] | None = None  # (prompt ids, the logits (1, V) after them)

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        context_length: int | None = None,
        compile: bool = False,
        chunk_starts: Collection[int] = (),
        prefix_cache_bytes: int = 0,
        aot: bool | None = None,
    ) -> None:
        """`prefix_cache_bytes`: keep up to this many bytes of recent prompts' latents, chunk by chunk, and
        start a prompt that begins the same way after them (prefix_cache.py; 0: off). `aot`: decode steps
        through libraries compiled ahead of time (model/aot.py; None: where `aot.default_on` says, unless
        `compile`), not batch-invariant; False: the batch-invariant eager decoder (the module's docstring)."""
        cfg = model.config
        if max_batch_size < 1 or max_queue < 0 or prefill_chunk < 1:
            raise UserError(
                f"need max_batch_size >= 1, max_queue >= 0 and prefill_chunk >= 1 "
                f"(got {max_batch_size}, {max_queue}, {prefill_chunk})"
            )
        self.model, self.tokenizer, self.compile = model.eval(), tokenizer, compile
        self.aot = aot if aot is not None else not compile and self.draft_tokens == 0 and default_on(model)
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.context_length = min(context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        special = special_token_ids(tokenizer) if tokenizer is not None else {}
        self.eos_token_id = next((i for i in (cfg.eos_token_id, special.get("eot")) if i is not None), None)
        self.pad_token_id = next(
            (i for i in (cfg.pad_token_id, special.get("pad"), self.eos_token_id) if i is not None), 0
        )
        self._device = next(model.parameters()).device
        # tokens before which a prefill chunk starts: a chat template's user-turn token (chunking.py)
        self.chunk_starts = frozenset(chunk_starts)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        # chat turns that ended, as the conversation's next prompt will start: prefilled into the prefix cache
        # when nothing else waits to be prefilled (`_prefill_ahead`); the oldest dropped beyond one per slot
        self._ahead: collections.deque[Request] = collections.deque(maxlen=max_batch_size)
        self._build()
        self._stamp = weights_stamp(model)
        self._rows: list[Request] = []  # decoding, in cache slots 0..n-1
        self._prefilling: collections.deque[Request] = collections.deque()  # admitted: a slot is theirs
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._closing: str | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run
        self.repeated_prompts = 0  # prompts started from the same prompt's prefill just before (`_repeat`)

    # the caller's side (any thread) -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Prompt ids as `Engine.encode` makes them (an empty prompt: the end-of-text token alone)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids or ([self.eos_token_id] if self.eos_token_id is not None else [])

    @property
    def capacity(self) -> int:
        """Requests the engine can ever hold at once: one per slot, and `max_queue` waiting."""
        return self.max_batch_size + self.max_queue

    @property
    def closing(self) -> str | None:
        """Why the engine stops (`close`), or None while it serves."""
        return self._closing

    def check(self, prompt_tokens: int, max_tokens: int, params: Params | None = None) -> None:
        """Raise a `UserError` naming the numbers when a request cannot run. With `params.prompt_logprobs`,
        max_tokens may be 0 (the prompt is scored, nothing generated)."""
        if prompt_tokens < 1:
            raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        least = 0 if params is not None and params.prompt_logprobs is not None else 1
        if max_tokens < least:
            raise UserError(f"max_tokens must be at least {least}, got {max_tokens}")
        if prompt_tokens + max_tokens > self.context_length:
            raise UserError(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together "
                f"{prompt_tokens + max_tokens}, more than the {self.context_length}-token context; "
                "shorten the prompt or lower max_tokens"
            )
        if params is not None and (name := self.unsupported(params)) is not None:
            raise UserError(f"{name} is not supported by this engine")

    def unsupported(self, params: Params) -> str | None:
        """The first setting of `params` this engine cannot honour, or None."""
        return None

    def submit(
        self, prompt_ids: Sequence[int], params: Params, sink: Callable[[Event], None] | None = None
    ) -> Request:
        """Queue a prompt. `sink(event)` is called from the loop's thread; without one, read
        `request.events()`. Raises `UserError` (see `check`) or `QueueFullError`."""
        return self.submit_all([(prompt_ids, params, sink)])[0]

    def submit_all(
        self, items: Sequence[tuple[Sequence[int], Params, Callable[[Event], None] | None]]
    ) -> list[Request]:
        """Queue several prompts, all or none: a `UserError` when one cannot run or when they are more than
        the engine can ever hold (`capacity`: waiting would never help), a `QueueFullError` when they do not
        fit now."""
        for ids, params, _ in items:
            self.check(len(ids), params.max_tokens, params)
        if len(items) > self.capacity:
            raise UserError(
                f"{len(items)} generations at once are more than this server ever holds: {self.capacity} "
                f"({self.max_batch_size} slots and a queue of {self.max_queue})"
            )
        requests = [Request(list(ids), params, sink) for ids, params, sink in items]
        with self._lock:
            if self._closing:
                raise QueueFullError(f"the engine is stopping ({self._closing})")
            room = self.max_queue + max(self._free_slots(), 0) - len(self._waiting)
            if len(requests) > room:
                raise QueueFullError(
                    f"all {self.max_batch_size} slots are busy and {len(self._waiting)} requests wait "
                    f"(at most {self.max_queue})"
                )
            self._waiting.extend(requests)
            self._lock.notify()
        return requests

    @property
    def ahead(self) -> int:
        """Ended chat turns still waiting to be prefilled for the conversation's next turn (`_prefill_ahead`)."""
        return len(self._ahead)

    def stats(self) -> dict[str, int]:
        """Requests waiting for a slot, being prefilled, and decoding (a snapshot)."""
        with self._lock:
            return dict(waiting=len(self._waiting), prefilling=len(self._prefilling), running=len(self._rows))

    def start(self, warm_up: bool = True) -> BatchEngine:
        """Start the loop's thread; `warm_up` first runs one step at every batch size the loop can use, so
        that no request pays oneDNN's first call at a new size (~0.2 s each on the seed architecture) or,
        with `compile`, a compilation (~20 s per size: rows rounded up to a power of 2)."""
        if warm_up:
            with torch.inference_mode():
                for rows in sorted({self._step_rows(n) for n in range(1, self.max_batch_size + 1)}):
                    self._warm_up(rows)
        self._thread = threading.Thread(target=self._loop, name="deepseek-lm-batching", daemon=True)
        self._thread.start()
        return self

    def close(self, reason: str = "the server is shutting down", timeout: float | None = 30) -> None:
        """Stop the loop after its current step; every unfinished request ends with an "error" event."""
        with self._lock:
            self._closing = reason
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _free_slots(self) -> int:
        return self.max_batch_size - len(self._rows) - len(self._prefilling)

    def _build(self) -> None:
        """The decoder, the prefill and the caches: built once, the weights rearranged for decoding and for
        prefilling (~25 + 20 ms on the seed preset) serve every request."""
        model, n, device = self.model, self.max_batch_size, self._device
        self.decoder = Decoder(model, n, compile=self.compile, batch_invariant=not (self.compile or self.aot))
        # compiled steps: batch 1, and from 2 rows a library per kind of step (`aot.library_batch`); built
        # (or loaded) by the warm-up
        self._aot_steps: dict[int, AOTDecoder] = {}
        self.fast_prefill = Prefill(model) if Prefill.supports(model) else None  # model/prefill.py
        # chunks under its MIN_TOKENS through a library too (model/aot.py)
        self._short_prefill = CompiledPrefill(model) if self.aot else None
        # compiled ahead of time, the steps read the first L positions of the slots, L < the slots' length
        self.cache = model.new_cache(n, self.context_length + self.aot, device=device)
        self._staging = model.new_cache(1, self.context_length, device=device)
        self._staged = None

    def _warm_up(self, rows: int) -> None:
        ids = torch.full((rows, 1), self.pad_token_id, dtype=torch.long, device=self._device)
        kvs = [kv[:rows, : self._attended(1)] for kv in self.cache.kv]  # free slots: garbage is fine
        self._step(ids, torch.zeros_like(ids), kvs)

    def _step(
        self, ids: torch.Tensor, pos: torch.Tensor, kvs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> the logits (B, V) after ids (B, 1) at pos (B, 1), and their argmax where the step takes it."""
        if not self.aot:
            return self.decoder.step(ids, pos, kvs), None
        size = library_batch(self.model.config, ids.shape[0])
        if size not in self._aot_steps:
            self._aot_steps[size] = AOTDecoder(self.model, size, slot_positions=self.cache.max_len)
        return self._aot_steps[size].compiled(ids, pos, kvs)

    # the loop (its own thread) ------------------------------------------------------------------------------
    # Every request is answered: work that concerns one request runs under `_guarded`, which fails that
    # request alone (an error event; its slot freed) when it raises, and the one step all running rows
    # share fails those rows; the others keep running, the queue keeps its requests.

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (
                        self._closing or self._waiting or self._prefilling or self._rows or self._ahead
                    ):
                        self._lock.wait()
                    if self._closing:
                        break
                    idle = not (self._prefilling or self._rows)
                    while self._waiting and self._free_slots() > 0:
                        self._prefilling.append(self._waiting.popleft())
                try:
                    if idle:
                        self._follow_weights()
                    self._iteration()
                except Exception as e:  # a bug in the loop's own bookkeeping: fail what holds a slot
                    traceback.print_exc(file=sys.stderr)
                    self._fail([*self._rows, *self._prefilling], _internal(e))
        self._fail_all(self._closing, waiting=True)

    def _follow_weights(self) -> None:
        """Between bursts of requests (nothing decoding), rebuild the decoder, prefill and caches if the
        model's weights changed since they were built (`weights_stamp`): a policy that trains between
        rollouts (rl/) is sampled with its current weights. ~45 ms on the seed preset, only after a change."""
        stamp = weights_stamp(self.model)
        if stamp is not None and stamp != self._stamp:
            self._build()
            self._stamp = stamp
            if self.prefix_cache is not None:  # its latents are the old weights'
                self.prefix_cache.clear()
            self._ahead.clear()

    def _iteration(self) -> None:
        self._drop_cancelled()
        budget = self.prefill_chunk  # prompt tokens this iteration: whole chunks, at least one
        while self._prefilling:
            request = self._prefilling[0]
            if request._cuts is None and self._repeats(request):
                self._guarded([request], self._repeat, request)
                continue
            if request._cuts is None:
                self._guarded([request], self._plan, request)
                if request.done:
                    continue
            start = request._prefilled
            # the prompt's own chunks (chunking.py): its numbers never depend on the queue
            end = request._cuts[bisect.bisect_right(request._cuts, start)]
            if end - start > budget:
                break
            budget -= end - start
            self._guarded([request], self._prefill, request, start, end)
        if self._ahead and not self._prefilling:
            try:
                self._prefill_ahead(budget)
            except Exception:  # work for no request: dropped, nothing else disturbed
                traceback.print_exc(file=sys.stderr)
                self._ahead.popleft()
        if self._rows:
            self._guarded(list(self._rows), self._decode_step)

    def _guarded(self, requests: list[Request], work: Callable, *args: Any) -> Any:
        """`work(*args)`'s result; if it raises, `requests` fail with the error (and None is returned)."""
        try:
            return work(*args)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self._fail(requests, _internal(e))
            return None

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in itertools.chain(self._waiting, self._prefilling) if r._cancelled]
            for request in gone:
                (self._waiting if request in self._waiting else self._prefilling).remove(request)
        for request in gone:
            self._finish(request, "cancelled")
        for request in [r for r in self._rows if r._cancelled]:
            self._release(request)
            self._finish(request, "cancelled")

    def _plan(self, request: Request) -> None:
        """Cut the prompt into its chunks, and start it after the leading ones the prefix cache holds; its
        last chunk is always computed (its state gives the first token), and a scored prompt, which needs
        every position's state, is prefilled whole and not kept."""
        ids = request.prompt_ids
        request._cuts = chunk_ends(ids, self.prefill_chunk, self.chunk_starts)
        if self.prefix_cache is None or request.params.prompt_logprobs is not None:
            return
        request._keys = chunk_keys(ids, request._cuts)
        staged = [kv[0] for kv in self._staging.kv]
        self._staged = None
        n = self.prefix_cache.restore(request._keys[:-1], request._cuts[:-1], staged)
        self.prefix_cache.count(len(ids), n)
        request._prefilled = request.cached_tokens = n

    def _queue_ahead(self, request: Request) -> None:
        """A chat turn ended: queue what the conversation's next prompt starts with, for `_prefill_ahead`:
        the turn's prompt, its answer as the next prompt carries it (the text the client was sent, encoded
        again: a model may have split a word where the tokenizer would not) and the end-of-turn token."""
        p, reason = request.params, request.finish_reason
        if self.prefix_cache is None or not p.stop_token_ids or reason not in ("eos", "length"):
            return
        answer = request._answer[:-1] if reason == "eos" else request._answer  # "eos": its last ends the turn
        text = self.tokenizer.decode(answer, skip_special_tokens=True)  # what TextStream sent
        answer = self.tokenizer.encode(text, add_special_tokens=False).ids
        ids = [*request.prompt_ids, *answer, p.stop_token_ids[0]]
        if len(ids) >= self.context_length:  # no room for a next turn
            return
        job = Request(ids, Params(max_tokens=0), _discard)
        job._cuts = chunk_ends(ids, self.prefill_chunk, self.chunk_starts)
        job._keys = chunk_keys(ids, job._cuts)
        self._ahead.append(job)

    def _prefill_ahead(self, budget: int) -> None:
        """Prefill the oldest ended turn's chunks that the prefix cache lacks (the previous answer's, as the
        next prompt will cut them), within `budget` tokens, and keep them there: the next turn's prompt
        then computes only its new question. Unfinished, the turn goes on at a later iteration, from the
        cache (the staging cache may be another prompt's by then); a next turn that comes first computes
        the chunks itself and leaves this nothing to do. The chunks are computed exactly as the next
        prompt's prefill computes them (`_prefill_chunk`), so reusing them changes no number."""
        job, staged = self._ahead[0], [kv[0] for kv in self._staging.kv]
        self._staged = None
        start = self.prefix_cache.restore(job._keys, job._cuts, staged)
        for key, end in zip(job._keys, job._cuts):
            if end <= start:
                continue
            if end - start > budget:
                return
            self._prefill_chunk(job, start, end)
            self.prefix_cache.store(key, start, end, staged)
            self.prefix_cache.ahead_tokens += end - start
            budget -= end - start
            start = end
        self._ahead.popleft()

    def _prefill(self, request: Request, start: int, end: int) -> None:
        scored = request.params.prompt_logprobs is not None
        hidden = self._prefill_chunk(request, start, end, every_state=scored)  # (1, D), scored: (1, T, D)
        request._prefilled = end
        # a scored prompt's chunks are not kept: a prefill asked for every state may take another path than
        # the one a prompt's own prefill takes, and the cache must hold what that computes, bitwise
        if self.prefix_cache is not None and not scored:
            key = request._keys[bisect.bisect_left(request._cuts, end)]
            self.prefix_cache.store(key, start, end, [kv[0] for kv in self._staging.kv])
        if scored:
            self._score_prompt(request, self.decoder.logits(hidden)[0], start, end)
            hidden = hidden[:, -1]
        if end == request.prompt_tokens:
            with self._lock:
                self._prefilling.popleft()
            if request.params.max_tokens == 0:  # scored only
                request.finish_reason = "length"
                event = Event("", [], time.monotonic(), "length", prompt_logprobs=request._prompt_logprobs)
                return self._send(request, event)
            logits = self.decoder.logits(hidden)
            if self.repeats_staged and not scored:
                self._staged = (request.prompt_ids, logits)
            self._start_decoding(request, logits)

    def _score_prompt(self, request: Request, logits_TV: torch.Tensor, start: int, end: int) -> None:
        """The log-probabilities of prompt tokens start + 1 .. end (those these positions predict)."""
        targets = request.prompt_ids[start + 1 : end + 1]
        scored = token_logprobs(
            log_softmax(logits_TV[: len(targets)]), targets, request.params.prompt_logprobs
        )
        request._prompt_logprobs = (request._prompt_logprobs or []) + scored

    def _prefill_chunk(
        self, request: Request, start: int, end: int, every_state: bool = False
    ) -> torch.Tensor:
        """Prompt tokens start..end - 1 into the staging cache -> the final-normed state after them (1, D),
        or with `every_state` the state after each of them (1, T, D)."""
        self._staged = None
        ids = torch.tensor([request.prompt_ids[start:end]], device=self._device)  # (1, T)
        short = self._short_prefill
        return fill(
            self.model, self.fast_prefill, ids, self._staging, start, every_state=every_state, short=short
        )

    def _repeats(self, request: Request) -> bool:
        """Whether the staging cache holds this prompt, whole, with the logits after it: the prompt just
        prefilled, sent again (a request's `n` choices, RL's group of completions of one prompt)."""
        staged = self._staged
        if not self.repeats_staged or staged is None or request.params.prompt_logprobs is not None:
            return False
        return staged[0] == request.prompt_ids

    def _repeat(self, request: Request) -> None:
        """Start the request from the staged prompt: the same latents and logits its own prefill would
        compute (the same computation, done once), so its output is bitwise what it is alone."""
        with self._lock:
            self._prefilling.popleft()
        request._cuts = []
        request._prefilled = request.cached_tokens = request.prompt_tokens
        self.repeated_prompts += 1
        self._start_decoding(request, self._staged[1])

    def _start_decoding(self, request: Request, logits: torch.Tensor) -> None:
        """The prompt is in the staging cache and `logits` (1, V) follow it: sample the first token, and
        unless that ends the request, move its cache into the next slot."""
        p = request.params
        request._generator = make_generator(p.seed, self._device)
        request._stream = TextStream(self.tokenizer, list(p.stop), request.prompt_ids)
        grammar = p.grammar.matcher() if p.grammar is not None else None
        request._processor = RowProcessor(p.processing, request.prompt_ids, logits.shape[-1], grammar)
        request._pos = request.prompt_tokens
        event = self._advance(request, self._sample_row(logits[0], request), logits[0])
        event.prompt_logprobs = request._prompt_logprobs
        if event.finish_reason is None:
            self._join(request)
        self._send(request, event)

    def _join(self, request: Request) -> None:
        """Move the staged prompt into the next free slot: the request decodes from the next step."""
        slot, n = len(self._rows), request.prompt_tokens
        for kv, staged in zip(self.cache.kv, self._staging.kv):
            kv[slot, :n] = staged[0, :n]
        with self._lock:
            self._rows.append(request)

    def _decode_step(self) -> None:
        rows = list(self._rows)
        n = len(rows)
        B = self._step_rows(n)
        ids = torch.full((B, 1), self.pad_token_id, dtype=torch.long)  # (B, 1); padding rows: free slots
        pos = torch.zeros(B, 1, dtype=torch.long)
        ids[:n, 0] = torch.tensor([r._next_id for r in rows])
        pos[:n, 0] = torch.tensor([r._pos for r in rows])
        length = self._attended(int(pos.max()) + 1)
        kvs = [kv[:B, :length] for kv in self.cache.kv]
        logits, greedy = self._step(ids.to(self._device), pos.to(self._device), kvs)
        logits = logits[:n]  # (n, V)
        self.steps += 1
        for request, token, row in zip(rows, self._sample(logits, rows, greedy), logits):
            if token is not None:  # None: the request failed while its token was picked
                self._guarded([request], self._next, request, token, row)

    def _next(self, request: Request, token: int, logits: torch.Tensor) -> None:
        """A decoding row's next token: its event, and its slot freed when that ends it."""
        request._pos += 1
        event = self._advance(request, token, logits)
        if event.finish_reason is not None:
            self._release(request)  # first: whoever reads the last event finds the slot free
        self._send(request, event)

    def _step_rows(self, n: int) -> int:
        if not self.compile:
            return n
        bucket = 1  # compiled: one graph per power of 2
        while bucket < n:
            bucket *= 2
        return min(bucket, self.cache.batch_size)

    def _attended(self, end: int) -> int:
        """Cache positions a step attends to: up to the furthest row, rounded up to the decoder's attention
        slice (a row's numbers do not change with it); compiled, the whole context (one graph); ahead of
        time, exactly (one library serves every length)."""
        if self.aot:
            return max(end, 2)
        if self.compile:
            return self.context_length
        return min(-(-end // _KV_CHUNK) * _KV_CHUNK, self.context_length)

    def _sample(
        self, logits: torch.Tensor, requests: list[Request], argmax_ids: torch.Tensor | None = None
    ) -> list[int | None]:
        """(n, V) -> each row's next token, with its request's processing, settings and generator (None
        where that failed: the request is answered with the error); plain greedy rows in one argmax (or
        from `argmax_ids`, the step's own, when it took one)."""
        plain = [i for i, r in enumerate(requests) if r.params.sampling.greedy and not r._processor.active]
        tokens: list[int | None] = [None] * len(requests)
        if plain:
            picked = argmax_ids[plain] if argmax_ids is not None else argmax(logits[plain].float())
            for i, token in zip(plain, picked.tolist()):
                tokens[i] = token
        for i in sorted(set(range(len(requests))) - set(plain)):
            tokens[i] = self._guarded([requests[i]], self._sample_row, logits[i], requests[i])
        return tokens

    def _sample_row(self, logits_V: torch.Tensor, request: Request) -> int:
        processor = request._processor
        x = processor(logits_V) if processor.active else logits_V.float()
        return int(sample(x[None], request.params.sampling, request._generator)[0])

    def _advance(self, request: Request, token: int, logits: torch.Tensor) -> Event:
        """One generated token of the request -> its event (with a finish reason when it ends the request).
        `logits` (V,) are the model's, before the request's processing."""
        request.completion_tokens += 1
        request._answer.append(token)
        request._next_id = token
        request._processor.accept(token)
        p = request.params
        logprobs = (
            token_logprobs(log_softmax(logits[None]), [token], p.logprobs) if p.logprobs is not None else None
        )
        reason = None
        if token == self.eos_token_id or token in p.stop_token_ids:
            reason, piece = "eos", ""
        else:
            piece = request._stream.push(token)
            if request._stream.stopped:
                reason = "stop"
            elif request.completion_tokens >= p.max_tokens:
                reason = "length"
            elif request._pos >= self.context_length:
                reason = "context"
        kept = logits.float().cpu().clone() if p.output_logits else None
        if reason is None:
            return Event(piece, [token], time.monotonic(), logits=kept, logprobs=logprobs)
        request.finish_reason = reason
        text = piece + request._stream.finish()
        try:
            self._queue_ahead(request)
        except Exception:  # an optimisation for the next turn: never this request's failure
            traceback.print_exc(file=sys.stderr)
        return Event(text, [token], time.monotonic(), reason, logits=kept, logprobs=logprobs)

    def _send(self, request: Request, event: Event) -> None:
        """Hand the event to the request's sink. A sink that raises (its reader is gone or broken) is not
        called again: the request is cancelled, which frees its slot at the next step."""
        try:
            request._sink(event)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            request.cancel()

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.done:
            return
        request.finish_reason = reason
        self._send(request, Event("", [], time.monotonic(), reason, error))

    def _fail(self, requests: list[Request], why: str) -> None:
        """End `requests` with an error event, wherever they are: decoding (the slot is freed), prefilling or
        waiting."""
        for request in requests:
            if request.done:
                continue
            if request in self._rows:
                self._release(request)
            with self._lock:
                for place in (self._prefilling, self._waiting):
                    if request in place:
                        place.remove(request)
            self._finish(request, "error", why)

    def _release(self, request: Request) -> None:
        """Free a finished row's slot: the last row moves into it, so that occupied slots stay in front."""
        i, last = self._rows.index(request), len(self._rows) - 1
        if i != last:
            self._move_row(last, i, self._rows[last]._pos + 1)
        with self._lock:
            self._rows[i] = self._rows[last]
            self._rows.pop()

    def _move_row(self, src: int, dst: int, end: int) -> None:
        """Copy cache slot `src`'s first `end` positions into slot `dst`."""
        for kv in self.cache.kv:
            kv[dst, :end] = kv[src, :end]

    def _fail_all(self, why: str, waiting: bool) -> None:
        with self._lock:
            doomed = [*self._rows, *self._prefilling, *(self._waiting if waiting else ())]
            self._rows.clear()
            self._prefilling.clear()
            if waiting:
                self._waiting.clear()
        for request in doomed:
            self._finish(request, "error", why)


def _discard(event: Event) -> None:
    """The sink of the engine's own work (`_queue_ahead`): no one reads it."""


def _internal(e: Exception) -> str:
    return f"internal error: {type(e).__name__}: {e}"
