"""What happens to one row's next-token logits between the decoder and sampling, and what is read off them.

    processor = RowProcessor(Processing(presence=0.5, bias={17: -100.0}), prompt_ids, vocab_size)
    logits = processor(logits_V)          # bias, then penalties, then the grammar's mask
    token = sample(logits[None], ...)
    processor.accept(token)               # counts it (penalties) and advances the grammar

vLLM's semantics (its v1 sampler and `apply_penalties`), in its order:
1. `logit_bias`: added to the token's logit (OpenAI clamps the values to [-100, 100]; the caller does).
2. `repetition_penalty` (CTRL, an extension): a token seen in the prompt or the output so far has a positive
   logit divided by the penalty, a negative one multiplied by it.
3. `frequency_penalty`: subtracted once per occurrence of the token in the output so far (not the prompt);
   `presence_penalty`: subtracted once if the token occurs in the output at all. (OpenAI's definition.)
4. A grammar's mask (structured output, generate/grammar.py): tokens the grammar cannot continue with get
   -inf. (vLLM masks before the processors; the masked set is the same either way, the order changes
   nothing a sample can show: -inf stays -inf under every step above.)
Temperature, top-k and top-p then apply in `sampling.sample` as for any request.

Log-probabilities are read off the model's logits before any of this (vLLM's default `raw_logprobs`): the
log-softmax of what the model computed, whatever the request's sampling settings (`top_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's and vLLM's limit)


@dataclass(frozen=True)
class Processing:
    """One request's logit processing; the defaults change nothing."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.repetition != 1.0 or self.bias)


class RowProcessor:
    """A request's processing state: its output tokens' counts and the grammar's position. Built when the
    request starts decoding; `__call__` and `accept` run in the engine's loop, one row at a time."""

    def __init__(
        self, processing: Processing, prompt_ids: list[int], vocab_size: int, grammar: Any = None
    ) -> None:
        self.processing, self.grammar = processing, grammar
        self.active = processing.active or grammar is not None  # read per row and step: an attribute
        p = processing
        self._counts = torch.zeros(vocab_size) if (p.presence or p.frequency or p.repetition != 1.0) else None
        self._in_prompt = None
        if p.repetition != 1.0:
            self._in_prompt = torch.zeros(vocab_size, dtype=torch.bool)
            self._in_prompt[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self._bias = None
        if p.bias:
            self._bias = torch.zeros(vocab_size)
            self._bias[torch.tensor(list(p.bias))] = torch.tensor(list(p.bias.values()))

    def __call__(self, logits_V: torch.Tensor) -> torch.Tensor:
        """(V,) the decoder's logits -> (V,) fp32 the logits sampling draws from (a new tensor)."""
        x = logits_V.float().clone()
        p = self.processing
        if self._bias is not None:
            x += self._bias
        if self._counts is not None:
            if p.repetition != 1.0:
                seen = self._in_prompt | (self._counts > 0)
                x = torch.where(seen, torch.where(x > 0, x / p.repetition, x * p.repetition), x)
            if p.frequency:
                x -= p.frequency * self._counts
            if p.presence:
                x -= p.presence * (self._counts > 0).float()
        if self.grammar is not None:
            x.masked_fill_(~self.grammar.allowed(), float("-inf"))
        return x

    def accept(self, token: int) -> None:
        """The row's next token: counted for the penalties, consumed by the grammar."""
        if not self.active:
            return
        if self._counts is not None:
            self._counts[token] += 1
        if self.grammar is not None:
            self.grammar.accept(token)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (..., V) fp32 log-probabilities of the model's logits."""
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass
class TokenLogprobs:
    """One position's log-probabilities: the token's own, and the `k` most likely tokens' (best first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logprobs_TV: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """Each row's chosen token's log-probability and its row's top k, from (T, V) log-probabilities."""
    chosen = logprobs_TV.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    if k:
        values, ids = torch.topk(logprobs_TV, k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprobs(t, lp, top) for t, lp, top in zip(tokens, chosen, tops)]
