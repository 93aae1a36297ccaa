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
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens before it already reach p (so the one crossing p stays)
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (B,) long from logits (B, V). `seen` (B, V) bool feeds the repetition penalty."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    logits = top_p_filter(top_k_filter(logits, config.top_k), config.top_p)
    probs = logits.softmax(dim=-1)
    # The exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p (as in gpt-fast); one
    # vectorised pass, no host sync, unlike torch.multinomial.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
