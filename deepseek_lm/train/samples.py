"""Samples from fixed prompts during and after training, through the generation engine (latent KV cache)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepseek_lm.train.config import TrainConfig


def generate_samples(model: nn.Module, tokenizer: Any, cfg: TrainConfig, seed: int) -> list[str]:
    """One completion per prompt in `cfg.sample_prompts`, seeded so samples are comparable across steps.

    The engine switches the model to eval mode; the caller switches it back. Sampling draws from its own
    seeded generator, so the training RNG stream (and with it exact resume) is untouched.
    """
    from deepseek_lm.generate import Engine

    engine = Engine(model, tokenizer)
    with torch.random.fork_rng(devices=[]):
        completions = engine.generate(
            list(cfg.sample_prompts),
            max_new_tokens=cfg.sample_max_new_tokens,
            temperature=cfg.sample_temperature,
            top_k=cfg.sample_top_k,
            seed=seed,
        )
    return [c.text for c in completions]


def format_samples(prompts: list[str], texts: list[str]) -> str:
    lines = []
    for prompt, text in zip(prompts, texts):
        one_line = " ".join((prompt + text).split())
        lines.append(f"  > {one_line}")
    return "\n".join(lines)
