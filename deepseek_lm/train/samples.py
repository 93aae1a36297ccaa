"""Samples from fixed prompts during and after training, through the generation engine (latent KV cache)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepseek_lm.train.config import TrainConfig


def generate_samples(
    model: nn.Module, tokenizer: Any, cfg: TrainConfig, seed: int, chat_template: str | None = None
) -> list[str]:
    """One completion per prompt in `cfg.sample_prompts`, seeded so samples are comparable across steps.
    With a `chat_template` (fine-tuning) each prompt is a user message and the reply ends at the template's
    end of turn.

    The engine switches the model to eval mode; the caller switches it back. Sampling draws from its own
    seeded generator, so the training RNG stream (and with it exact resume) is untouched.
    """
    from deepseek_lm.generate import Engine

    engine, prompts, stops = Engine(model, tokenizer), list(cfg.sample_prompts), {}
    if chat_template is not None:
        from deepseek_lm.data.chat import ChatFormat

        fmt = ChatFormat.for_tokenizer(tokenizer, chat_template)
        prompts = [fmt.render([{"role": "user", "content": p}]) for p in prompts]
        stops = {"stop": list(fmt.stop), "stop_token_ids": fmt.stop_token_ids}
    with torch.random.fork_rng(devices=[]):
        completions = engine.generate(
            prompts,
            max_new_tokens=cfg.sample_max_new_tokens,
            temperature=cfg.sample_temperature,
            top_k=cfg.sample_top_k,
            seed=seed,
            **stops,
        )
    return [c.text for c in completions]


def format_samples(prompts: list[str], texts: list[str], between: str = "") -> str:
    lines = []
    for prompt, text in zip(prompts, texts):
        one_line = " ".join((prompt + between + text).split())
        lines.append(f"  > {one_line}")
    return "\n".join(lines)
