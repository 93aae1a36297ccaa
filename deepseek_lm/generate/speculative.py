"""Self-speculative decoding with the model's own MTP module: `Engine(model, tokenizer, speculative=True)`.

The first MTP module (model/mtp.py) drafts D tokens; the main model verifies them all in one forward, and
each round gives 1 + a tokens per row (a drafts accepted), distributed exactly as plain decoding's:
1. verify: the main model runs over [last token, d_1 .. d_D] at positions P .. P + D of the latent cache in
   one forward (model/draft.py `SpeculativeDecoder.verify`), giving D + 1 next-token distributions
   p_0 .. p_D under the sampling transforms (temperature, top-k, top-p; sampling.py `probabilities`).
2. accept: greedy keeps the longest prefix of drafts equal to the argmaxes, and the argmax after it; so the
   output is plain greedy's, token for token. Sampling keeps d_j with probability min(1, p_j(d_j) / q_j(d_j))
   in order (q_j: the draft's distribution under the same transforms) and draws the token at the first
   rejected position from normalise(max(0, p_j - q_j)), or from p_D when all D are kept: each token is then
   distributed as p, whatever q (Leviathan et al. 2023, Chen et al. 2023). A seed fixes the output, which is
   not plain sampling's with the same seed (the draws differ).
3. draft: the MTP module runs over the D + 1 verified pairs (h_{P+j}, t_{P+j+1}) in one forward, which
   writes its cache; its state at the last accepted position gives d'_1 (argmax, or a draw from q'_1). For
   D > 1 the module is chained on its own normed state and draft, one position further each (as SGLang's
   NextN and vLLM's MTP proposer do with DeepSeek-V3's single module).
Rollback copies nothing: the positions of rejected drafts are not advanced, so the next round overwrites
their latents, in both caches, before anything attends to them (the caches are position-indexed and masked).

The prompt is prefilled in one forward that keeps every position's state; the module then runs over the
prompt's pairs and the first token (`draft_prefill`), which fills its cache and gives the first draft.
The steps of a round are functions of a group of rows (`accept_greedy`, `accept_sampled`, `chain`), shared
with serve's continuous batching (speculative_batching.py), whose rows each have their own settings. Stop strings, the end of
text and the end of the context end a row as in plain decoding: a round's tokens are kept up to the first
end. The repetition penalty is not supported (it would make p depend on each draft's own prefix).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deepseek_lm.errors import UserError
from deepseek_lm.generate.sampling import SamplingConfig, argmax, draw, make_generator, probabilities, sample
from deepseek_lm.generate.state import COMPILED_CACHE_MULTIPLE, DecodeState, end_token_ids, right_pad
from deepseek_lm.model.draft import SpeculativeDecoder
from deepseek_lm.model.mla import make_positions
from deepseek_lm.model.prefill import Prefill, fill


@dataclass
class SpeculativeStats:
    """Counts over one `generate` call (rows still decoding only)."""

    rounds: int = 0  # verification forwards
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of them accepted
    histogram: list[int] = field(default_factory=list)  # row-rounds that accepted 0 .. D drafts

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


def accept_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, D + 1, V) of the verified positions, drafts (B, D) -> the argmaxes y (B, D + 1) and how
    many drafts each row keeps (B,): the longest prefix equal to the argmaxes (y[:, a] follows them)."""
    B, T, V = logits.shape
    y = argmax(logits.reshape(B * T, V)).view(B, T)
    return y, (drafts == y[:, :-1]).cumprod(1).sum(1)


def accept_sampled(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    q: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of rows that share `sampling` and `generator`: logits (B, D + 1, V), drafts
    (B, D) drawn from q (B, D, V) -> tokens (B, D + 1): the kept drafts, then the token drawn after them
    (later columns: rejected drafts); and how many drafts each row keeps (B,)."""
    B, T, V = logits.shape
    rows = torch.arange(B, device=logits.device)
    p = probabilities(logits.reshape(B * T, V), sampling).view(B, T, V)
    p_d, q_d = p[:, :-1].gather(2, drafts[..., None])[..., 0], q.gather(2, drafts[..., None])[..., 0]
    u = torch.rand(drafts.shape, generator=generator, dtype=torch.float64, device=drafts.device)
    accepted = (u * q_d < p_d).cumprod(1).sum(1)  # keep d_j with probability min(1, p / q)
    p_a = p[rows, accepted]  # (B, V) at the first rejection, or p_D
    q_a = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)[rows, accepted]  # zero past the drafts
    y = torch.cat((drafts, drafts[:, :1]), dim=1)
    y[rows, accepted] = draw(residual(p_a, q_a), generator)
    return y, accepted


Propose = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def chain(
    state: torch.Tensor, n_drafts: int, propose: Propose, step: Callable[..., torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drafts d_1 .. d_n (B, n) and their distributions (B, n, V) (None: greedy) from the module's state
    (B, D) after the newest token: d_1 from `state`, then the module on (its state, its draft) one position
    further per draft. propose(state (B, D)) -> (drafts (B,), distributions (B, V) or None); step(ids (B, 1),
    h (B, 1, D), k) -> the module's states (B, 1, D) at the newest token's position + k - 1."""
    drafts, qs = [], []
    for k in range(n_drafts):
        if k:
            state = step(drafts[-1][:, None], state[:, None], k)[:, 0]
        d, q = propose(state)
        drafts.append(d)
        qs.append(q)
    return torch.stack(drafts, dim=1), None if qs[0] is None else torch.stack(qs, dim=1)


def draft_prefill(
    model: Any, states: torch.Tensor, next_ids: torch.Tensor, start: int, draft_kv: torch.Tensor
) -> torch.Tensor:
    """The first MTP module (the model's forward, as a prefill) over the pairs (h_i, t_{i+1}) at positions
    start .. start + T - 1: states (B, T, D) the main model's, next_ids (B, T) the tokens one position ahead.
    Writes its latents into draft_kv (B, L, r + dr) -> its normed states (B, T, D)."""
    at = make_positions(model.rope, *next_ids.shape, start, True, draft_kv.shape[1])
    out, _, _ = model.mtp[0](states, model.embed_tokens(next_ids), at, draft_kv)
    return out


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where a rejected draft's replacement is drawn from: max(0, p - q) (B, V), unnormalised; p itself where
    that is all zero (p = q up to rounding, where a rejection has probability ~0)."""
    r = (p - q).clamp_(min=0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)


class SpeculativeState(DecodeState):
    """`DecodeState` (state.py) with rounds of drafts and verification instead of one token per step.

    Token t of a row is ready once the row has written t + 1 tokens: `step(t)` runs rounds until every
    decoding row has, and rows ahead keep their extra tokens. The bookkeeping (tokens written, positions,
    finished rows) lives on the host in numpy arrays: a round reads its accepted tokens back once, and the
    rest is host arithmetic instead of a hundred small tensor operations. B rows, D drafts per round."""

    def __init__(self, engine: Any, rows: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                 seed: int | None, output_logits: bool, stop_token_ids: Sequence[int] = ()) -> None:  # fmt: skip
        if sampling.repetition_penalty != 1:
            raise UserError("--repetition-penalty is not supported with speculative decoding; leave it at 1")
        self.model, self.tokenizer, self.sampling = engine.model, engine.tokenizer, sampling
        self.device, self.drafts_per_round = engine.device, engine.draft_tokens
        self.pad, self.max_new_tokens = engine.pad_token_id, max_new_tokens
        self.ends = end_token_ids(engine, stop_token_ids)  # end-of-sequence and the caller's stop tokens
        self.lengths = [len(r) for r in rows]
        self.budget = [min(max_new_tokens, engine.context_length - n) for n in self.lengths]
        self.steps = max(self.budget)
        self.generator = make_generator(seed, self.device)
        self.ended: set[int] = set()
        self.stopped_at: dict[int, int] = {}
        self.logits_log: list[torch.Tensor] | None = None
        self.seen = None
        self.stats = SpeculativeStats(histogram=[0] * (self.drafts_per_round + 1))
        self._allocate(engine, len(rows), output_logits)
        self._prefill(right_pad(rows, self.pad, self.device))

    def _allocate(self, engine: Any, B: int, output_logits: bool) -> None:
        """The decoder, both caches and the host-side buffers."""
        D, device = self.drafts_per_round, self.device
        # a round writes up to 2·D positions past a row's last token (D verified, D - 1 chained drafts after
        # the last accepted one): room for them past the last one kept
        cache_len = min(max(self.lengths) + self.max_new_tokens, engine.context_length) + 2 * D
        if engine.compile:  # compiled steps are specialised to the cache length: round it so calls share them
            cache_len = -(-cache_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
        self.decoder = engine.fast_path(SpeculativeDecoder, B, D + 1, compile=engine.compile)
        fast = Prefill.supports(self.model, B * max(self.lengths))  # model/prefill.py
        self.fast_prefill = engine.fast_path(Prefill) if fast else None
        self.cache = self.model.new_cache(B, cache_len, device=device)
        self.draft_kv = self.decoder.new_draft_cache(cache_len)
        width = max(self.steps, 1) + D + 1  # a round may write D + 1 tokens past the last one needed
        self.out = np.full((B, width), self.pad, dtype=np.int64)  # what the engine reads, as DecodeState's
        self.n = np.zeros(B, dtype=np.int64)  # tokens written per row
        self.budget_np = np.array(self.budget, dtype=np.int64)
        self.done = self.budget_np <= 0
        V = self.model.config.vocab_size
        self.logits_out = torch.zeros(B, width, V, device=device) if output_logits else None
        self.rows = torch.arange(B, device=device)

    def _prefill(self, prompt: torch.Tensor) -> None:
        """The prompts in one forward, keeping every position's state for the MTP module's prefill."""
        self.prompt = prompt
        self.prompt_states = fill(self.model, self.fast_prefill, prompt, self.cache, 0, every_state=True)
        self.pos = np.array(self.lengths, dtype=np.int64)  # position of each row's newest token
        last = torch.tensor(self.lengths, device=prompt.device) - 1
        self.logits = self.decoder.logits(self.prompt_states[self.rows, last])  # (B, V)

    # the engine's interface --------------------------------------------------------------------------------

    def step(self, t: int, last: bool) -> None:
        """Make token t of every decoding row available in `out` (`last`: no token is needed after it)."""
        if t == 0:
            self._first_token(last)
            return
        while ((self.n <= t) & ~self.done).any():
            self._round()

    def finished(self, t: int) -> bool:
        return bool(self.done.all()) and t + 1 >= int(self.n.max())

    def completions(self, streams):
        if self.logits_out is not None:
            self.logits_log = list(self.logits_out.unbind(1))
        return super().completions(streams)

    # rounds ------------------------------------------------------------------------------------------------

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def _first_token(self, last: bool) -> None:
        """Token 0 from the prefill's logits, as plain decoding; then the MTP module over the prompt."""
        y0 = sample(self.logits.float(), self.sampling, self.generator)  # (B,)
        self._emit(y0[:, None].cpu().numpy(), np.zeros_like(self.n), self.logits[:, None])
        if last or self.done.all():
            return
        # the module's pairs (h_i, t_{i+1}): the prompt shifted by one, then the first token at the row's end
        ids = torch.cat((self.prompt[:, 1:], self.prompt[:, :1]), dim=1)
        ids.scatter_(1, self._tensor(self.pos - 1)[:, None], y0[:, None])
        states = draft_prefill(self.model, self.prompt_states, ids, 0, self.draft_kv)
        self.last = y0
        self._chain(states[self.rows, self._tensor(self.pos - 1)])
        del self.prompt, self.prompt_states

    def _round(self) -> None:
        """Verify last + drafts, accept, write the tokens, then draft the next round's tokens."""
        T, P = self.drafts_per_round + 1, self.pos
        ids = torch.cat((self.last[:, None], self.drafts), dim=1)  # (B, T)
        pos_BT = self._tensor(P[:, None] + np.arange(T))
        end = int(P.max()) + T
        kvs = [self._upto(kv, end) for kv in self.cache.kv]
        if self.sampling.greedy:  # one function from the drafts to the next drafts (one graph compiled)
            draft_kv = self._upto(self.draft_kv, end + T - 2)
            y, accepted, drafts, logits = self.decoder.greedy_round(ids, pos_BT, kvs, draft_kv)
        else:
            states = self.decoder.verify(ids, pos_BT, kvs)  # (B, T, D_model)
            logits = self.decoder.logits(states)  # (B, T, V)
            y, accepted = accept_sampled(logits, self.drafts, self.q, self.sampling, self.generator)
        host = torch.cat((y, accepted[:, None]), dim=1).cpu().numpy()  # the round's one read-back
        self._record(host[:, -1])
        written = self._emit(host[:, :-1], host[:, -1], logits)
        self.last = y[self.rows, accepted]
        self.pos = P + written
        if self.sampling.greedy:
            self.drafts = drafts
            return
        # the module over the verified pairs (h_{P+j}, t_{P+j+1}); the state at the last kept position drafts
        states = self.decoder.draft(y, states, pos_BT, self._upto(self.draft_kv, end))
        self._chain(states[self.rows, accepted])

    def _upto(self, kv: torch.Tensor, end: int) -> torch.Tensor:
        """The cache positions a step attends to: up to `end` eager, all compiled (static shapes)."""
        return kv if self.decoder.compile else kv[:, :end]

    def _chain(self, state: torch.Tensor) -> None:
        """The next round's drafts (and their distributions) from the module's state after the newest token."""

        def step(ids: torch.Tensor, h: torch.Tensor, k: int) -> torch.Tensor:
            pos = self.pos + k - 1  # draft k + 1 is made at the newest token's position + k - 1
            kv = self._upto(self.draft_kv, int(pos.max()) + 1)
            return self.decoder.draft(ids, h, self._tensor(pos[:, None]), kv)

        self.drafts, self.q = chain(state, self.drafts_per_round, self._propose, step)  # (B, D), (B, D, V)

    def _propose(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.decoder.logits(state)
        if self.sampling.greedy:
            return argmax(logits), None
        q = probabilities(logits, self.sampling)
        return draw(q, self.generator), q

    def _emit(self, y: np.ndarray, accepted: np.ndarray, logits: torch.Tensor) -> np.ndarray:
        """Write each decoding row's tokens y[:, :accepted + 1] (B, T), cut after the end of text and at its
        budget; -> how many each row wrote (B,)."""
        j = np.arange(y.shape[1])
        keep = (
            (j <= accepted[:, None]) & ~self.done[:, None] & (self.n[:, None] + j < self.budget_np[:, None])
        )
        if self.ends:
            ends = np.isin(y, self.ends) & keep
            ended = ends.any(1)
            keep &= j <= np.where(ended, ends.argmax(1), y.shape[1])[:, None]
            self.done |= ended
        rows, cols = np.nonzero(keep)
        self.out[rows, self.n[rows] + cols] = y[rows, cols]
        if self.logits_out is not None:
            r, c = self._tensor(rows), self._tensor(cols)
            self.logits_out[r, self._tensor(self.n[rows]) + c] = logits[r, c].to(self.logits_out.dtype)
        written = keep.sum(1)
        self.n += written
        self.done |= self.n >= self.budget_np
        return written

    def _record(self, accepted: np.ndarray) -> None:
        """Acceptance counts of the rows decoding in this round."""
        active = ~self.done
        s = self.stats
        s.rounds += 1
        s.drafted += int(active.sum()) * self.drafts_per_round
        s.accepted += int(accepted[active].sum())
        s.histogram = (
            np.array(s.histogram) + np.bincount(accepted[active], minlength=len(s.histogram))
        ).tolist()
