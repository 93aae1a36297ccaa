"""The buffers and the step of one `Engine.generate` call (engine.py), apart from the engine so that the
speculative state (speculative.py) builds on them without importing the engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepseek_lm.generate.sampling import SamplingConfig, make_generator, sample
from deepseek_lm.generate.streaming import TextStream
from deepseek_lm.model.aot import ENGINE_MAX_BATCH, AOTDecoder, CompiledPrefill
from deepseek_lm.model.decode import Decoder
from deepseek_lm.model.prefill import MIN_TOKENS, Prefill, fill

COMPILED_CACHE_MULTIPLE = 256  # cache lengths of a compiled engine: one graph serves all calls up to it


@dataclass
class Completion:
    text: str  # the generated text (no prompt, no special tokens, cut before a stop string)
    token_ids: list[int]  # generated ids, EOS excluded; with a stop string, up to the token completing it
    # "eos" (the end-of-sequence token or one of `stop_token_ids`, e.g. a chat template's end of turn) | "stop"
    # (a stop string) | "length" (max_new_tokens) | "context" (window full)
    finish_reason: str
    prompt_tokens: int  # prompt length after any truncation
    logits: torch.Tensor | None = None  # (len(token_ids) (+1 when EOS ended it), V) fp32, on request


class DecodeState:
    """The buffers of one `generate` call: cache, positions, generated ids, finished rows, RNG."""

    def __init__(
        self,
        engine: Any,
        rows: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingConfig,
        seed: int | None,
        output_logits: bool,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        model, device = engine.model, engine.device
        self.model, self.tokenizer, self.sampling = model, engine.tokenizer, sampling
        self.pad, self.max_new_tokens = engine.pad_token_id, max_new_tokens
        self.ends = end_token_ids(engine, stop_token_ids)
        self.ends_t = torch.tensor(self.ends, dtype=torch.long, device=device)
        self.lengths = [len(r) for r in rows]
        batch, longest, ctx = len(rows), max(self.lengths), engine.context_length
        # per row: new tokens before max_new_tokens or the end of the context, whichever comes first
        self.budget = [min(max_new_tokens, ctx - n) for n in self.lengths]
        self.steps = max(self.budget)
        cache_len = min(longest + max_new_tokens, ctx)
        if engine.compile:  # compiled steps are specialised to the cache length: round it so calls share them
            cache_len = min(-(-cache_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE, ctx)
        self.cache = model.new_cache(batch, cache_len, device=device)
        self.generator = make_generator(seed, device)
        self.out = torch.full((batch, max(self.steps, 1)), self.pad, dtype=torch.long, device=device)
        self.done = torch.tensor([n <= 0 for n in self.budget], device=device)
        self.budget_t = torch.tensor(self.budget, device=device)
        self.min_budget = min(self.budget)
        self.ended: set[int] = set()  # rows whose text is complete (EOS or a stop string), host side
        self.stopped_at: dict[int, int] = {}  # row -> step of the token that completed a stop string
        self.logits_log: list[torch.Tensor] | None = [] if output_logits else None
        # (B, V) bool: the tokens each row holds so far, for the repetition penalty
        self.seen = (
            _seen_mask(rows, model.config.vocab_size, device) if sampling.repetition_penalty != 1 else None
        )
        if engine.aot and batch <= ENGINE_MAX_BATCH:  # model/aot.py
            self.decoder = engine.fast_path(AOTDecoder, batch)
        else:  # model/decode.py
            self.decoder = engine.fast_path(Decoder, batch, compile=engine.compile)
        self.greedy_ids: torch.Tensor | None = None  # (B,) the step's argmax, where it computes one
        fast = Prefill.supports(model, batch * longest)  # built only where it will run: model/prefill.py
        self.fast_prefill = engine.fast_path(Prefill) if fast else None
        short = engine.aot and batch == 1 and 2 <= longest < MIN_TOKENS  # model/aot.py
        self.short_prefill = engine.fast_path(CompiledPrefill) if short else None
        self.logits, self.pos = self._prefill(right_pad(rows, self.pad, device))

    def _next_logits(self, ids: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        """Run `ids` (B, T) through the model at `start_pos`; -> the logits after the last one (B, V)."""
        if ids.shape[1] == 1:
            logits, self.greedy_ids = self.decoder.with_argmax(ids, self.cache, start_pos)
            return logits
        hidden = fill(self.model, self.fast_prefill, ids, self.cache, start_pos, short=self.short_prefill)
        return self.decoder.logits(hidden)

    def _prefill(self, prompt: torch.Tensor) -> tuple[torch.Tensor, int | torch.Tensor]:
        """Fill the cache with the prompts; return next-token logits (B, V) and the next positions."""
        longest = prompt.size(1)
        if all(n == longest for n in self.lengths):
            return self._next_logits(prompt, 0), longest
        # ragged: all but the last column in one pass, then each row's last token at its own position
        if longest > 1:
            fill(self.model, self.fast_prefill, prompt[:, :-1], self.cache, 0)
        last_pos = torch.tensor(self.lengths, device=prompt.device) - 1  # (B,)
        last_tok = prompt.gather(1, last_pos[:, None])  # (B, 1)
        return self._next_logits(last_tok, last_pos), last_pos + 1

    def step(self, t: int, last: bool) -> None:
        """Pick token t of every row from the current logits, then (unless `last`) run it through the model."""
        logits = self.logits.float()
        if self.logits_log is not None:
            self.logits_log.append(logits.clone())
        if self.greedy_ids is not None and self.sampling.greedy and self.seen is None:
            nxt = self.greedy_ids  # taken in the step: the argmax `sample` would take
        else:
            nxt = sample(logits, self.sampling, self.generator, self.seen)  # (B,)
        nxt.masked_fill_(self.done, self.pad)
        self.out[:, t] = nxt
        if self.ends:
            self.done |= torch.isin(nxt, self.ends_t)
        if t + 1 >= self.min_budget:  # (a host check: on a CPU each tiny op costs more than the step's math)
            self.done |= self.budget_t <= t + 1
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        if last:
            return
        self.logits = self._next_logits(nxt[:, None], self.pos)
        # per-row positions: a finished row stays on its last slot, so it never outgrows the cache
        self.pos = self.pos + 1 if isinstance(self.pos, int) else self.pos + (~self.done).long()

    def finished(self, t: int) -> bool:
        """Every row done after step t."""
        return bool(self.done.all())

    def completions(self, streams: list[TextStream] | None) -> list[Completion]:
        logits = torch.stack(self.logits_log, dim=1) if self.logits_log else None  # (B, steps, V)
        results = []
        for b, ids in enumerate(self.out.tolist()):
            ids, reason = self._finish_row(b, ids)
            if streams is not None:
                text = streams[b].text
            else:
                text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
            n_logits = len(ids) + (reason == "eos")
            row_logits = logits[b, :n_logits] if logits is not None else None
            results.append(Completion(text, ids, reason, self.lengths[b], row_logits))
        return results

    def _finish_row(self, b: int, ids: list[int]) -> tuple[list[int], str]:
        ids = ids[: self.budget[b]]
        if b in self.stopped_at:  # cut first: the pad after it may be the EOS id
            return ids[: self.stopped_at[b] + 1], "stop"
        end = next((t for t, token in enumerate(ids) if token in self.ends), None)
        if end is not None:
            return ids[:end], "eos"
        return ids, "length" if self.budget[b] == self.max_new_tokens else "context"


def end_token_ids(engine: Any, stop_token_ids: Sequence[int]) -> list[int]:
    """The tokens that end a row: the end-of-sequence token and the caller's stop tokens."""
    return list(dict.fromkeys(i for i in (engine.eos_token_id, *stop_token_ids) if i is not None))


def right_pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    prompt = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        prompt[b, : len(r)] = torch.tensor(r)
    return prompt.to(device)


def _seen_mask(rows: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool)  # (B, V)
    for b, r in enumerate(rows):
        seen[b, r] = True
    return seen.to(device)
