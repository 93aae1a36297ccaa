"""Rollouts: the policy's completions of chat prompts, sampled through the continuous-batching engine
(generate/batching.py), the engine that `serve` runs.

One engine serves the whole run. Between rollout batches the trainer updates the weights in place; the
engine notices (their version stamps changed) when its next batch arrives and rebuilds its decoder from
them, so every rollout is sampled from the policy's current weights. Each completion has a seed of its own,
derived from the run's seed, the step and its place in the batch: the same completion alone or in any batch,
the same as `Engine.generate` with that seed (tested), and the same after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.generate.batching import BatchEngine, Params
from deepseek_lm.generate.sampling import SamplingConfig


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # what the model wrote, its end of turn included when it ended one
    text: str  # the reply as a reader sees it: no special tokens, no stop string
    finish_reason: str  # eos (end of turn) | stop | length | context


def completion_seed(seed: int, step: int, index: int) -> int:
    """A seed per completion, independent across runs, steps and completions."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0] >> 1)


class Rollouts:
    """Sampling `model` (a training model: switched to eval mode for the rollout, back to train after)."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, fmt: ChatFormat, slots: int, context: int
    ) -> None:
        self.model, self.fmt = model, fmt
        # every prompt of a batch is admitted at once; an evaluation queues its several hundred
        self.engine = BatchEngine(
            model, tokenizer, max_batch_size=slots, max_queue=1 << 16, context_length=context
        )
        self.engine.start(warm_up=False)
        model.train()

    def sample(
        self, prompts: list[list[int]], max_tokens: int, temperature: float, seeds: list[int] | None
    ) -> list[Completion]:
        """One completion per prompt (ids of a rendered chat prompt): sampled at `temperature` with the
        full distribution (no top-k or top-p: the samples are the policy's), or greedy at 0."""
        sampling = SamplingConfig(temperature=temperature, top_k=None, top_p=1.0)
        stops = dict(stop=self.fmt.stop, stop_token_ids=self.fmt.stop_token_ids)
        was_training = self.model.training
        self.model.eval()
        try:
            requests = [
                self.engine.submit(ids, Params(max_tokens, sampling, seeds[i] if seeds else None, **stops))
                for i, ids in enumerate(prompts)
            ]
            return [_collect(r) for r in requests]
        finally:
            self.model.train(was_training)

    def close(self) -> None:
        self.engine.close("the run is over")


def _collect(request: Any) -> Completion:
    tokens, text = [], []
    for event in request.events():
        if event.error:
            raise RuntimeError(f"the batch engine failed a rollout: {event.error}")
        tokens += event.token_ids
        text.append(event.text)
    return Completion(list(request.prompt_ids), tokens, "".join(text), request.finish_reason)
