"""GRPO's objective (rl/grpo.py) against a hand-computed example: group advantages, clipping on both sides,
the k3 KL to the reference, and which tokens pass a gradient."""

import math

import pytest
import torch

from deepseek_lm.rl.grpo import group_advantages, grpo_loss, token_logprobs


def test_group_advantages_normalise_within_each_group():
    A = group_advantages(torch.tensor([1.0, 0.0, 3.0, 1.0, 2.0, 2.0]), group_size=2)
    # (r - mean) / (std + 1e-4), std with Bessel's correction: sqrt(0.5) and sqrt(2); a flat group gives 0
    a, b = 0.5 / (math.sqrt(0.5) + 1e-4), 1.0 / (math.sqrt(2.0) + 1e-4)
    assert A.tolist() == pytest.approx([a, -a, b, -b, 0.0, 0.0], abs=1e-6)
    G4 = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    mean, std = 0.25, math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    assert G4.tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in (1, 0, 0, 0)], abs=1e-6)


def test_loss_clips_on_both_sides_and_adds_the_k3_kl():
    a, b = 0.7, 0.4  # advantages of two groups of two
    advantages = torch.tensor([a, -a, b, -b])
    ratio = torch.tensor([[1.5, 0.5], [0.5, 1.5], [1.0, 1.1], [0.9, 3.0]])  # ρ = π / π_old per token
    q = torch.tensor([[1.0, 2.0], [1.0, 0.5], [2.0, 1.0], [0.5, 1.0]])  # π_ref / π per token
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])  # the last completion is one token long
    logp = torch.log(torch.tensor([[0.3, 0.2], [0.1, 0.4], [0.25, 0.5], [0.6, 0.05]])).requires_grad_()
    old = logp.detach() - ratio.log()
    ref = logp.detach() + q.log()
    beta, eps = 0.1, 0.2
    out = grpo_loss(logp, old, ref, advantages, mask, clip=eps, kl_weight=beta)

    def k3(x):  # π_ref/π - log(π_ref/π) - 1
        return x - math.log(x) - 1

    # by hand: -min(ρA, clip(ρ, 0.8, 1.2)A) + β k3, token means per completion, then the mean
    c0 = [-(1.2 * a) + beta * k3(1.0), -(0.5 * a) + beta * k3(2.0)]  # ρ 1.5, A > 0: clipped at 1.2
    c1 = [-(-0.8 * a) + beta * k3(1.0), -(-1.5 * a) + beta * k3(0.5)]  # ρ 0.5, A < 0: clipped at 0.8
    c2 = [-(1.0 * b) + beta * k3(2.0), -(1.1 * b) + beta * k3(1.0)]
    c3 = [-(-0.9 * b) + beta * k3(0.5)]
    expected = (sum(c0) / 2 + sum(c1) / 2 + sum(c2) / 2 + sum(c3)) / 4
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.clipped.item() == pytest.approx(2 / 7)  # the two clipped tokens of seven
    kls = [k3(1.0), k3(2.0), k3(1.0), k3(0.5), k3(2.0), k3(1.0), k3(0.5)]
    assert out.kl.item() == pytest.approx(sum(kls) / 7, abs=1e-6)

    out.loss.backward()
    grad = logp.grad
    # a clipped token passes no gradient (its KL term has none either: π_ref = π there); the ratio's
    # derivative in log π is ρ, the k3's is 1 - π_ref/π; each weighted by 1 / (length · completions)
    assert grad[0, 0].item() == 0 and grad[1, 0].item() == 0
    assert grad[0, 1].item() == pytest.approx((-0.5 * a + beta * (1 - 2.0)) / 8, abs=1e-6)
    assert grad[1, 1].item() == pytest.approx((1.5 * a + beta * (1 - 0.5)) / 8, abs=1e-6)
    assert grad[3, 0].item() == pytest.approx((0.9 * b + beta * (1 - 0.5)) / 4, abs=1e-6)
    assert grad[3, 1].item() == 0  # padding


def test_one_update_per_batch_is_the_policy_gradient():
    """With π_old = π (detached) the ratio is 1 everywhere: the gradient is -A ∇log π / length, no clipping."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    out = grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, -1.0]), torch.ones(2, 2), 0.2, 0.0)
    out.loss.backward()
    assert out.clipped.item() == 0 and out.kl.item() == 0
    assert logp.grad.tolist() == [[-0.25, -0.25], [0.25, 0.25]]


def test_token_logprobs_and_entropy_at_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    logp, entropy = token_logprobs(logits, torch.tensor([[1]]), temperature=2.0, with_entropy=True)
    p = torch.softmax(logits[0, 0] / 2.0, -1)
    assert logp.item() == pytest.approx(math.log(p[1].item()), abs=1e-6)
    assert entropy.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)
