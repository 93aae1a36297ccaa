"""Structured output: a grammar (JSON schema, any JSON object, a regular expression, a Lark grammar, one of
some strings) masks each step's tokens to those that keep the output inside it, through llguidance.

    grammars = Grammars(tokenizer, vocab_size=model.config.vocab_size, eos_token_id=0)
    grammar = grammars.json_schema({"type": "object", ...})      # UserError naming the problem if invalid
    matcher = grammar.matcher()                                   # one per request
    allowed = matcher.allowed()                                   # (V,) bool
    matcher.accept(token)

Why llguidance: measured (benchmarks/structured_masks.py: random walks through a JSON schema, the dev VM at
load ~4.2, commit a2b7552), the mask costs per token at the demo's 4,100-token vocabulary / the default
8,192: llguidance mean 34 / 70 µs (p50 12 / 17), xgrammar 12 / 8 (p50 5 / 5), outlines-core 53 / 80 (p50
2 / 2, p95 139 / 281); against a demo decode step of ~4 ms every one is under 2 %. xgrammar is the fastest,
but its requirements pull triton (a GPU compiler) into a CPU install; outlines-core builds an index of the
whole regular language before the first token (120 / 219 ms for this schema, growing with it) and takes no
context-free grammar; llguidance compiles lazily (34 / 71 ms with its tokenizer view, built once), takes
Lark grammars besides JSON schemas and regular expressions, and needs nothing else installed. The mask is
computed on the loop's thread, per row, when the row's token is picked (benchmarks/structured_output.py
measures it inside the engine).
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from deepseek_lm.errors import UserError

_CACHED = 64  # compiled grammars kept (least recently used dropped): repeated schemas compile once


class Grammars:
    """Grammars over one tokenizer; the llguidance tokenizer is built on first use (~0.1 s)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_token_id: int | None) -> None:
        self._tokenizer, self.vocab_size, self.eos_token_id = tokenizer, vocab_size, eos_token_id
        self._compiled: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    @functools.cached_property
    def _ll_tokenizer(self) -> Any:
        import llguidance

        return llguidance.LLTokenizer(
            self._tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_token_id
        )

    def json_schema(self, schema: dict) -> Grammar:
        from llguidance import LLMatcher

        try:
            # compact JSON (", " and ": ", no other whitespace): free whitespace lets a small model pad
            # forever, and the text parses the same
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), {"whitespace_flexible": False})
            return self._grammar(grammar, "JSON schema")
        except ValueError as e:
            raise UserError(f"the JSON schema is not usable: {e}") from None

    def json_object(self) -> Grammar:
        return self.json_schema({"type": "object"})

    def regex(self, pattern: str) -> Grammar:
        from llguidance import LLMatcher

        return self._grammar(LLMatcher.grammar_from_regex(pattern), "regular expression")

    def lark(self, grammar: str) -> Grammar:
        from llguidance import LLMatcher

        return self._grammar(LLMatcher.grammar_from_lark(grammar), "grammar")

    def choice(self, options: list[str]) -> Grammar:
        """Exactly one of `options` (vLLM's `choice`)."""
        return self.lark("start: " + " | ".join(json.dumps(o) for o in options))

    def _grammar(self, grammar: str, what: str) -> Grammar:
        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
        from llguidance import LLMatcher

        if problem := LLMatcher.validate_grammar(grammar, self._ll_tokenizer):
            raise UserError(f"the {what} is not usable: {_one_line(problem)}")
        compiled = Grammar(self._ll_tokenizer, grammar, self.vocab_size)
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > _CACHED:
                self._compiled.popitem(last=False)
        return compiled


class Grammar:
    """A checked grammar; `matcher()` starts a request's walk through it."""

    def __init__(self, ll_tokenizer: Any, grammar: str, vocab_size: int) -> None:
        from llguidance import LLMatcher

        # requests copy one matcher at the start: the copies share its lexer, whose states llguidance builds
        # as they are first reached (a fresh matcher per request rebuilt them: ~2x the mean mask cost)
        self._start, self.vocab_size = LLMatcher(ll_tokenizer, grammar), vocab_size

    def matcher(self) -> Matcher:
        return Matcher(self._start.deep_copy(), self.vocab_size)


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, ll_matcher: Any, vocab_size: int) -> None:
        self._m, self.vocab_size = ll_matcher, vocab_size
        self._check()

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output inside the grammar (after the end: end-of-text)."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        self._check()
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool))

    def accept(self, token: int) -> None:
        self._m.consume_token(token)
        self._check()

    @property
    def done(self) -> bool:
        return self._m.is_stopped()

    def _check(self) -> None:
        if self._m.is_error():
            raise RuntimeError(f"structured output: {_one_line(self._m.get_error())}")


def _one_line(message: str) -> str:
    return " ".join(message.split())[:300]
