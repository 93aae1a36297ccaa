"""Sampling: pure functions from next-token logits (B, V) to token ids (B,).

Order of the transforms, as in Hugging Face's `generate` and nanoGPT's `sample.py`: repetition penalty →
temperature → top-k → top-p → draw. Temperature 0 means greedy (argmax; top-k and top-p are then moot).
Every random draw goes through an explicit `torch.Generator`, so a seed fixes the sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deepseek_lm.errors import UserError


@dataclass
class SamplingConfig:
    """How to pick the next token. Defaults follow nanoGPT's sampler (temperature 0.8, top-k 200)."""

    temperature: float = 0.8  # 0 = greedy; > 1 flattens, < 1 sharpens the distribution
    top_k: int | None = 200  # keep the k most likely tokens (None or 0: all); clamped to the vocabulary
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches p (1.0: off)
    repetition_penalty: float = 1.0  # CTRL-style penalty on tokens already in the row (1.0: off)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 or None disables it), got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `seed`, or from OS entropy when `seed` is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already present in the row less likely (CTRL, Keskar et al. 2019).

    logits (B, V) float; seen (B, V) bool. A seen token's positive logit is divided by `penalty`, a negative
    one multiplied by it, so the penalty always pushes it down for `penalty > 1`.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) the first index of each row's maximum, exactly as `logits.argmax(-1)`.

    On a CPU torch's argmax is a scalar loop (~57 µs per 49,152-wide row on the dev machine) while `amax`
    is vectorised: so the maximum of each block of the row comes first, then argmax over the block maxima
    and inside the first block that holds the row's maximum (2× faster at batch 1, 6× at batch 8). That
    block holds the maximum's first index, NaN (argmax's maximum) included.
    """
    B, V = logits.shape
    block = next((b for b in (1024, 512, 256, 128, 64) if V % b == 0 and b < V), None)
    if block is None or logits.device.type != "cpu":
        return logits.argmax(dim=-1)
    blocks = logits.reshape(B, V // block, block)
    first = blocks.amax(-1).argmax(-1)  # (B,) the first block holding the row's maximum
    rows = torch.arange(B, device=logits.device)
    return first * block + blocks[rows, first].argmax(-1)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Set all but the `k` largest logits per row to -inf. `k` above the vocabulary keeps everything."""
    vocab = logits.size(-1)
    if not k or k >= vocab:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the most likely tokens until their probability
    reaches `p`; the most likely token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    kept = _nucleus_of_sorted(sorted_logits, p)
    return logits.masked_fill(~kept.scatter(-1, order, kept), float("-inf"))


def _nucleus_of_sorted(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, K) bool: which tokens of descending logits form the nucleus."""
    probs = sorted_logits.softmax(dim=-1)
    # keep a token while the tokens before it have not reached p yet (so the one crossing p stays)
    return (probs.cumsum(dim=-1) - probs) < p


def sample(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (B,) long from logits (B, V). `seen` (B, V) bool feeds the repetition penalty.

    Same distribution as `softmax(top_p_filter(top_k_filter(logits / T)))`, computed on the k candidates
    only: one top-k over the vocabulary, then everything else on (B, k).
    """
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return argmax(logits)
    logits = logits.float() / config.temperature
    vocab = logits.size(-1)
    k = min(config.top_k or vocab, vocab)
    if k == vocab and config.top_p >= 1.0:
        return _draw(logits, generator)
    cand, ids = torch.topk(logits, k, dim=-1)  # (B, k) descending (k = V is a full sort, for top-p)
    if config.top_p < 1.0:
        cand = cand.masked_fill(~_nucleus_of_sorted(cand, config.top_p), float("-inf"))
    return ids.gather(-1, _draw(cand, generator)[:, None])[:, 0]


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The distribution `sample` draws from, (B, V) fp32 over the whole vocabulary: temperature, top-k and
    top-p applied by the same operations (the same top-k, so ties break the same way); greedy: the argmax's
    one-hot. (No repetition penalty: it depends on the row's tokens, which the caller applies first.)"""
    if config.greedy:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(1, argmax(logits)[:, None], 1.0)
    logits = logits.float() / config.temperature
    vocab = logits.size(-1)
    k = min(config.top_k or vocab, vocab)
    if k == vocab and config.top_p >= 1.0:
        return logits.softmax(dim=-1)
    cand, ids = torch.topk(logits, k, dim=-1)  # (B, k) descending
    if config.top_p < 1.0:
        cand = cand.masked_fill(~_nucleus_of_sorted(cand, config.top_p), float("-inf"))
    return torch.zeros_like(logits).scatter_(1, ids, cand.softmax(dim=-1))


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of probs (B, V) (non-negative, not necessarily normalised) -> (B,) long."""
    return _draw_cdf(probs.to(torch.float64).cumsum(dim=-1), generator)


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row with probability softmax(logits), by inverting the CDF at a uniform draw.

    fp64 so that u < cdf[-1] always holds; side="right" never lands on a zero-probability token. (Cheaper
    on CPU than torch.multinomial or the exponential race, both of which draw one random number per token.)
    """
    return _draw_cdf(logits.softmax(dim=-1, dtype=torch.float64).cumsum(dim=-1), generator)


def _draw_cdf(cdf: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """cdf (B, K) fp64 -> (B,) the first index whose cumulative mass exceeds a uniform draw below cdf[-1]."""
    u = torch.rand(cdf.size(0), 1, generator=generator, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.size(-1) - 1)
