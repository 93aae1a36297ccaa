"""Continuous batching with self-speculative decoding: what `deepseek-lm serve --speculative` runs.

    engine = SpeculativeBatchEngine(model, tokenizer, draft_tokens=1, max_batch_size=8).start()
    request = engine.submit(engine.encode("Once upon"), Params(max_tokens=32, seed=0))
    print("".join(e.text for e in request.events()), request.accepted / request.drafted)

batching.py's loop (admission, chunked prefill, cancellation, slots), with a speculative round over the
running rows where it runs a one-token step. The round is generate/speculative.py's, for rows that each
have their own settings and generator:
1. verify: the main model over each row's newest token and its D drafts at its own positions, one forward
   of n·(D + 1) tokens (model/draft.py `SpeculativeDecoder`);
2. accept: greedy rows keep the longest prefix of drafts equal to the argmaxes (`accept_greedy`), sampled
   rows run speculative sampling under their own temperature / top-k / top-p with their own generator
   (`accept_sampled`): rows keep different numbers of drafts;
3. draft: the MTP module over every row's D + 1 verified pairs, then its chained steps (`chain`), give each
   row its next D drafts (a batch of greedy rows runs 1-3 as one function, `greedy_round`);
4. each row's 1 + a tokens become one event each, through plain serving's ends (end of text, stop tokens and
   strings, max_tokens, the end of the context); a row that ends, or was cancelled, leaves its slot at the
   round's end. Rejected drafts are rolled back by not advancing the row's position (both caches are
   position-indexed and masked: the next round overwrites them).
A joining request's prompt is prefilled in plain serving's chunks; each chunk also runs the module over
the chunk's pairs (h_i, t_{i+1}) into a one-row staging draft cache, the last state waiting for the next
chunk's first token (`draft_prefill`). Once the first token is sampled, the last pair gives the module's
state, its first drafts, and both staged caches move into the request's slot.

What holds bitwise. Every step of a round is built batch-invariant (`SpeculativeDecoder(...,
batch_invariant=True)`: every product through oneDNN over weights laid out once, the module's too; routing
padded; the attention's values summed over fixed slices, over lengths that are multiples of that slice
here), and acceptance and drafting read only the row's own logits, drafts and generator. So a row's numbers
at every step are those it would get alone, hence its drafts, what it accepts and the logits its tokens
come from: greedy output, and sampled output with a `seed`, is the same alone or in a full batch of any
mix of requests, logits bitwise (tests/test_speculative_batching.py). Against plain serving: greedy tokens
are plain greedy's (the verification's argmax of the same model), but a verification's logits are a
different arrangement of the same sums (D + 1 tokens per row) and differ from a plain step's in the last
bits, so a near-tie between two tokens could resolve differently; the tests compare tokens on a trained
model. Sampled output with a seed is reproducible, and distributed as plain sampling, but not plain
sampling's draws with that seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepseek_lm.errors import UserError
from deepseek_lm.generate.batching import BatchEngine, Params, Request
from deepseek_lm.generate.sampling import argmax, draw, probabilities
from deepseek_lm.generate.speculative import accept_greedy, accept_sampled, chain, draft_prefill
from deepseek_lm.model.decode import _KV_CHUNK
from deepseek_lm.model.draft import SpeculativeDecoder
from deepseek_lm.model.prefill import Prefill, fill


class SpeculativeBatchEngine(BatchEngine):
    """`BatchEngine` whose steps are speculative rounds, the model's first MTP module drafting `draft_tokens`
    tokens per row. Each request counts its `drafted` and `accepted` tokens; the first event of each of its
    rounds carries that round's counts."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, draft_tokens: int = 1, **options: Any):
        if not model.config.num_nextn_predict_layers:
            raise UserError(
                "speculative decoding needs MTP modules and this model has none (num_nextn_predict_layers=0): "
                "train with --model.num_nextn_predict_layers 1, or serve without --speculative"
            )
        if draft_tokens < 1:
            raise UserError(f"draft_tokens must be at least 1, got {draft_tokens}")
        if options.get("compile"):
            raise UserError(
                "--compile is not supported with --speculative: speculative serving runs the batch-invariant "
                "eager decoder; leave out one of them"
            )
        if options.get("prefix_cache_bytes"):
            raise UserError(
                "prefix caching is not supported with --speculative (the MTP module's cache would need it "
                "too): leave out one of them"
            )
        self.draft_tokens = draft_tokens
        super().__init__(model, tokenizer, **options)

    # set-up ---------------------------------------------------------------------------------------------------

    repeats_staged = False  # the staged MTP pairs are the request's own (`_join` consumes them)

    def _build(self) -> None:
        model, n, device, D = self.model, self.max_batch_size, self._device, self.draft_tokens
        # a round writes up to 2·D - 1 positions past a row's newest token (D verified, then chained drafts
        # after the last kept one); a multiple of the attention slice, so that every length attended is one
        self._cache_len = -(-(self.context_length + 2 * D) // _KV_CHUNK) * _KV_CHUNK
        self.decoder = SpeculativeDecoder(model, n, D + 1, batch_invariant=True)
        self.fast_prefill = Prefill(model) if Prefill.supports(model) else None  # model/prefill.py
        self.cache = model.new_cache(n, self._cache_len, device=device)
        self._staging = model.new_cache(1, self._cache_len, device=device)
        self.draft_cache = self.decoder.new_draft_cache(self._cache_len)  # (n, L, r + dr)
        self._draft_staging = self.decoder.new_draft_cache(self._cache_len, batch_size=1)

    def _warm_up(self, rows: int) -> None:
        T = self.draft_tokens + 1
        ids = torch.full((rows, T), self.pad_token_id, dtype=torch.long, device=self._device)
        pos = torch.arange(T, device=self._device).expand(rows, T)
        kvs = [kv[:rows, : self._attended(T)] for kv in self.cache.kv]  # free slots: garbage is fine
        self.decoder.greedy_round(ids, pos, kvs, self.draft_cache[:rows, : self._attended(2 * T)])

    def _attended(self, end: int) -> int:
        """Cache positions a step attends to: up to `end`, rounded up to the decoder's attention slice."""
        return min(-(-end // _KV_CHUNK) * _KV_CHUNK, self._cache_len)

    # joining ----------------------------------------------------------------------------------------------

    def unsupported(self, params: Params) -> str | None:
        """Speculative rounds accept and draft from the model's own distribution: no logit processing,
        structured output or log-probabilities (serve them without --speculative)."""
        names = dict(
            logprobs=params.logprobs is not None or params.prompt_logprobs is not None,
            penalties_or_logit_bias=params.processing.active,
            response_format=params.grammar is not None,
        )
        return next((name for name, used in names.items() if used), None)

    def _prefill_chunk(
        self, request: Request, start: int, end: int, every_state: bool = False
    ) -> torch.Tensor:
        """The main model over the chunk (every position's state kept), then the MTP module over the pairs
        (h_i, t_{i+1}) whose next token is in the prompt; the last state waits (`_join`)."""
        ids = torch.tensor([request.prompt_ids[start:end]], device=self._device)  # (1, T)
        hidden = fill(self.model, self.fast_prefill, ids, self._staging, start, every_state=True)  # (1, T, D)
        pending = hidden if start == 0 else torch.cat((request._pending, hidden), dim=1)
        if end < request.prompt_tokens:
            first = end - pending.shape[1]  # the position of pending's first state
            if pending.shape[1] > 1:
                ahead = torch.tensor([request.prompt_ids[first + 1 : end]], device=self._device)
                draft_prefill(self.model, pending[:, :-1], ahead, first, self._draft_staging)
            pending = pending[:, -1:]
        request._pending = pending
        return hidden if every_state else hidden[:, -1]

    def _join(self, request: Request) -> None:
        """The module over the last pairs, the newest one (h_{n-1}, the first token); its state drafts the
        first round's tokens; both staged caches move into the slot."""
        n, pending = request.prompt_tokens, request._pending
        first = n - pending.shape[1]
        ahead = torch.tensor([[*request.prompt_ids[first + 1 :], request._next_id]], device=self._device)
        states = draft_prefill(self.model, pending, ahead, first, self._draft_staging)  # (1, k, D)
        request._pending = None
        kv = self._draft_staging[:, : self._attended(n + self.draft_tokens)]  # chained drafts: n .. n + D - 2
        step = self._chain_step(kv, torch.tensor([n], device=self._device))
        drafts, q = chain(states[:, -1], self.draft_tokens, self._proposer([request]), step)
        request._drafts, request._q = drafts[0], None if q is None else q[0]
        self.draft_cache[len(self._rows), :n] = self._draft_staging[0, :n]
        super()._join(request)

    # rounds -----------------------------------------------------------------------------------------------

    def _decode_step(self) -> None:
        """One round over the running rows: verify, accept, draft, then each row's tokens as events."""
        rows, D = list(self._rows), self.draft_tokens
        n, T = len(rows), D + 1
        P = np.array([r._pos for r in rows])  # each row's newest token's position
        newest = torch.tensor([r._next_id for r in rows], device=self._device)
        drafts = torch.stack([r._drafts for r in rows])  # (n, D)
        ids = torch.cat((newest[:, None], drafts), dim=1)  # (n, T)
        pos_BT = torch.from_numpy(P[:, None] + np.arange(T)).to(self._device)
        top = int(P.max())
        kvs = [kv[:n, : self._attended(top + T)] for kv in self.cache.kv]
        draft_kv = self.draft_cache[:n, : self._attended(top + 2 * D)]  # the chained drafts reach P + 2D - 1
        if all(r.params.sampling.greedy for r in rows):  # verify, accept and draft as one function
            y, accepted, drafts, logits = self.decoder.greedy_round(ids, pos_BT, kvs, draft_kv)
            q = None
        else:
            states = self.decoder.verify(ids, pos_BT, kvs)  # (n, T, D_model)
            logits = self.decoder.logits(states)  # (n, T, V)
            y, accepted = self._accept(logits, drafts, rows)
            # the module over the verified pairs (h_{P+j}, y_j); its state at the last kept one drafts
            states = self.decoder.draft(y, states, pos_BT, draft_kv)[torch.arange(n), accepted]
            step = self._chain_step(draft_kv, pos_BT[:, 0] + accepted + 1)
            drafts, q = chain(states, D, self._proposer(rows), step)
        self.steps += 1
        host = torch.cat((y, accepted[:, None]), dim=1).cpu().numpy()  # the round's one read-back
        for i, request in enumerate(rows):
            request._drafts, request._q = drafts[i], None if q is None else q[i]
            self._guarded([request], self._emit, request, host[i, :-1], int(host[i, -1]), logits[i])

    def _accept(self, logits: torch.Tensor, drafts: torch.Tensor, rows: list[Request]):
        """-> tokens (n, T) and drafts kept (n,): greedy rows together, sampled rows each with its own
        settings and generator."""
        y, accepted = torch.empty_like(logits[..., 0], dtype=torch.long), torch.empty_like(drafts[:, 0])
        greedy = [i for i, r in enumerate(rows) if r.params.sampling.greedy]
        if greedy:
            y[greedy], accepted[greedy] = accept_greedy(logits[greedy], drafts[greedy])
        for i, r in enumerate(rows):
            if not r.params.sampling.greedy:
                one = slice(i, i + 1)
                y[one], accepted[one] = accept_sampled(
                    logits[one], drafts[one], r._q[None], r.params.sampling, r._generator
                )
        return y, accepted

    def _proposer(self, rows: list[Request]):
        """`chain`'s propose for these rows: the head over the module's states, then greedy rows' argmaxes
        and sampled rows' draws under their own settings and generators."""

        def propose(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            logits = self.decoder.logits(state)  # (n, V)
            greedy = [i for i, r in enumerate(rows) if r.params.sampling.greedy]
            if len(greedy) == len(rows):
                return argmax(logits), None
            drafts, q = torch.empty_like(logits[:, 0], dtype=torch.long), torch.zeros_like(logits)
            if greedy:
                drafts[greedy] = argmax(logits[greedy])
            for i, r in enumerate(rows):
                if not r.params.sampling.greedy:
                    q[i : i + 1] = probabilities(logits[i : i + 1], r.params.sampling)
                    drafts[i : i + 1] = draw(q[i : i + 1], r._generator)
            return drafts, q

        return propose

    def _chain_step(self, kv: torch.Tensor, newest: torch.Tensor):
        """`chain`'s step over these rows' draft cache, `newest` (n,) their newest tokens' positions."""

        def step(ids: torch.Tensor, h: torch.Tensor, k: int) -> torch.Tensor:
            return self.decoder.draft(ids, h, (newest + k - 1)[:, None], kv)  # at (n, 1)

        return step

    def _emit(self, request: Request, tokens: np.ndarray, accepted: int, logits: torch.Tensor) -> None:
        """The row's kept tokens (the accepted drafts, then the token after them) as events, up to its end."""
        request.drafted += self.draft_tokens
        request.accepted += accepted
        for j in range(accepted + 1):
            request._pos += 1
            event = self._advance(request, int(tokens[j]), logits[j])
            if j == 0:
                event.drafted, event.accepted = self.draft_tokens, accepted
            if event.finish_reason is not None:
                self._release(request)  # first: whoever reads the last event finds the slot free
                self._send(request, event)
                return
            self._send(request, event)

    def _move_row(self, src: int, dst: int, end: int) -> None:
        # a row that leaves mid-round can move one whose tokens of this round are not emitted yet: its
        # position is still the round's first, and the round wrote up to 2·D - 1 positions past it
        end = min(end + 2 * self.draft_tokens, self._cache_len)
        super()._move_row(src, dst, end)
        self.draft_cache[dst, :end] = self.draft_cache[src, :end]
