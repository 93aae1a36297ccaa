"""RL's training settings: `TrainConfig` plus GRPO's knobs (`--train.group_size`, ...), and RL's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepseek_lm.errors import UserError
from deepseek_lm.train.config import TrainConfig

# Asked greedily after the run (user messages through the template): one of each built-in task's kind.
RL_PROMPTS = [
    "Which module provides `urlopen`?",
    "What arguments does `json.dumps` take?",
    "Which functions does the `shlex` module provide?",
    "What is 23 + 19?",
]

# RL's overrides of TrainConfig's defaults: a 5-minute wall-clock budget, AdamW at a constant learning rate
# after 5 warmup steps (the policy should move little per step: GRPO's clipped ratio and the KL keep it near
# its rollouts and its reference), no weight decay (it would pull the SFT model's weights towards 0 for
# no reward), every rollout batch in one forward pass, held-out rewards every 25 steps. Figures: README, "RL".
# fmt: off
RL_DEFAULTS: dict[str, Any] = dict(
    seq_len=256, micro_batch_size=64, grad_accum_steps=1, epochs=1.0, max_steps=None, max_time_minutes=5.0,
    schedule_by_time=False, optimizer="adamw", lr=1e-4, warmup_steps=5, decay="constant", min_lr_ratio=1.0,
    weight_decay=0.0, grad_clip=1.0, eval_every=25, save_every=50, sample_every=0, log_every=5,
    sample_prompts=RL_PROMPTS, sample_max_new_tokens=64, sample_temperature=0.0,
)
# fmt: on


@dataclass
class RLConfig(TrainConfig):
    """Training settings of `deepseek-lm rl`: the trainer's, and GRPO's below. One step: `prompts_per_step`
    prompts × `group_size` completions sampled, rewarded, then `updates_per_batch` optimizer updates on them,
    each over forward passes of `micro_batch_size` completions (`grad_accum_steps` is not used). `seq_len` is
    the longest prompt plus completion (longer prompts are left out, counted in a warning)."""

    # rl (GRPO, DeepSeekMath §4.1)
    group_size: int = 8
    """G: completions sampled per prompt; their rewards are normalised within the group (the advantages)."""
    prompts_per_step: int = 8
    """Prompts per rollout batch (from each task in turn)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (> 0; no top-k or top-p: the samples are the policy's own)."""
    max_new_tokens: int = 64
    """Longest completion; one cut there ends without its end of turn, and is rewarded as it is."""
    clip_range: float = 0.2
    """ε: the probability ratio to the rollouts' policy is clipped to [1 - ε, 1 + ε] (PPO)."""
    kl_weight: float = 0.04
    """β: weight of the k3 KL estimate to the frozen reference (the starting weights); 0: no reference."""
    updates_per_batch: int = 1
    """μ: optimizer updates on each rollout batch (> 1 makes the clipped ratio matter)."""
    eval_prompts: int = 64
    """Held-out prompts per task in the periodic evaluations (greedy); the first and last use them all."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ["group_size", "prompts_per_step", "max_new_tokens", "updates_per_batch", "eval_prompts"]:
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be > 0 (got {getattr(self, name)})")
        if self.group_size < 2:
            raise UserError(
                f"train.group_size must be >= 2: advantages compare completions (got {self.group_size})"
            )
        if not self.temperature > 0:
            raise UserError(f"train.temperature must be > 0: rollouts are sampled (got {self.temperature})")
        if not 0 < self.clip_range < 1 or self.kl_weight < 0:
            raise UserError(
                f"need 0 < train.clip_range < 1 and train.kl_weight >= 0 (got {self.clip_range}, {self.kl_weight})"
            )
        if self.max_new_tokens >= self.seq_len:
            raise UserError(
                f"train.max_new_tokens {self.max_new_tokens} leaves no room for a prompt in train.seq_len {self.seq_len}"
            )

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size
