"""GRPO's objective (DeepSeekMath §4.1, eq. 3 with the outcome-reward advantages of §4.1.2), as pure functions.

For each prompt a group of G completions o_1..o_G is sampled from the policy as it was (π_old); rewards
r_1..r_G are normalised within the group, and that is each token's advantage (no value model):

    A_i = (r_i - mean(r)) / (std(r) + eps)                              std with Bessel's correction, as TRL

    J(θ) = mean_i 1/|o_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1 - ε, 1 + ε) A_i) - β KL_it ]
    ρ_it = π_θ(o_it | q, o_i<t) / π_old(o_it | ...)
    KL_it = π_ref / π_θ - log(π_ref / π_θ) - 1                            Schulman's k3: unbiased, >= 0

The loss is -J. Clipping takes the pessimistic side: a token whose ratio has moved past 1 + ε in the
direction its advantage rewards (ρ > 1 + ε with A > 0, ρ < 1 - ε with A < 0) contributes no gradient; one
that moved the other way keeps its unclipped, larger penalty. With one update per rollout batch ρ = 1 at
every token (π_old is the current policy, detached) and the gradient is the plain policy gradient A ∇ log π.
Legend: N completions (prompts × G), T completion positions (padded), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards_N: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards, consecutive groups of `group_size` completions of one prompt → (N,) advantages. A
    group whose rewards are all equal gets advantage 0 at every completion: nothing to learn from it."""
    r_PG = rewards_N.float().view(-1, group_size)
    mean, std = r_PG.mean(dim=1, keepdim=True), r_PG.std(dim=1, keepdim=True)
    return ((r_PG - mean) / (std + eps)).view(-1)


def token_logprobs(
    logits_xV: torch.Tensor, tokens_x: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(token) at the sampling temperature (the distribution the completions were drawn from), fp32,
    for logits (..., V) and tokens (...); with `with_entropy` also π's entropy there (nats, no gradient)."""
    logp_xV = torch.log_softmax(logits_xV.float() / temperature, dim=-1)
    logp = logp_xV.gather(-1, tokens_x.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        return logp, -(logp_xV.exp() * logp_xV).sum(-1)


@dataclass
class GRPOLoss:
    loss: torch.Tensor  # () -J, differentiable through logp
    kl: torch.Tensor  # () mean k3 over completion tokens (no gradient)
    clipped: torch.Tensor  # () fraction of completion tokens whose clipped term was the one taken
    ratio_max: torch.Tensor  # () largest ρ


def grpo_loss(
    logp_NT: torch.Tensor,
    old_logp_NT: torch.Tensor,
    ref_logp_NT: torch.Tensor | None,
    advantages_N: torch.Tensor,
    mask_NT: torch.Tensor,
    clip: float,
    kl_weight: float,
) -> GRPOLoss:
    """-J(θ) over completions, each token weighted by `mask_NT` (1 on completion tokens, 0 on padding).
    `ref_logp_NT` None (or `kl_weight` 0): no KL term."""
    mask = mask_NT.float()
    ratio = torch.exp(logp_NT - old_logp_NT)  # (N, T)
    A = advantages_N[:, None]
    unclipped, clipped = ratio * A, torch.clamp(ratio, 1 - clip, 1 + clip) * A
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp_NT)
    if ref_logp_NT is not None and kl_weight:
        log_ref_over_pi = ref_logp_NT - logp_NT
        kl = torch.exp(log_ref_over_pi) - log_ref_over_pi - 1
        per_token = per_token + kl_weight * kl
    lengths = mask.sum(dim=1).clamp(min=1)  # (N,)
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()  # each completion's token mean, then the mean
    tokens = mask.sum().clamp(min=1)
    with torch.no_grad():
        took_clip = clipped < unclipped  # ρ past 1 + ε with A > 0, or past 1 - ε with A < 0
        return GRPOLoss(
            loss,
            (kl * mask).sum() / tokens,
            (took_clip.float() * mask).sum() / tokens,
            (ratio * mask).max() if mask.any() else ratio.new_ones(()),
        )
