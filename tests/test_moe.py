"""DeepSeekMoE: the grouped dispatch equals a plain per-token reference (forward and gradients); balancing."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model import MoE, get_model


def _moe(**overrides) -> MoE:
    base = dict(hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=12)
    config = DeepSeekConfig.from_preset("tiny", **{**base, **overrides})
    moe = get_model(config).layers[-1].mlp
    with torch.no_grad():  # routing far from uniform, and a bias that matters
        moe.gate.weight.normal_(0, 0.5)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return moe


# the reference: every token on its own, experts by plain matmuls --------------------------------------------


def _ref_route(moe: MoE, x_D: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    cfg = moe.config
    logits = moe.gate.weight.float() @ x_D.float()
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    choice = (scores + moe.gate.e_score_correction_bias).tolist()
    per_group = cfg.n_routed_experts // cfg.n_group
    groups = [choice[g * per_group : (g + 1) * per_group] for g in range(cfg.n_group)]
    if cfg.scoring_func == "sigmoid":
        group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
    else:
        group_score = [max(g) for g in groups]
    best_groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
    allowed = [e for e in range(cfg.n_routed_experts) if e // per_group in best_groups]
    ids = sorted(allowed, key=lambda e: -choice[e])[: cfg.num_experts_per_tok]
    w = [scores[e] for e in ids]
    if cfg.norm_topk_prob:
        total = sum(w) + 1e-20
        w = [wi / total for wi in w]
    return ids, [wi * cfg.routed_scaling_factor for wi in w]


def _ref_expert(moe: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    inter = moe.config.moe_intermediate_size
    w_gu, w_down = moe.experts.gate_up_proj[e], moe.experts.down_proj[e]
    return w_down @ (F.silu(w_gu[:inter] @ x_D) * (w_gu[inter:] @ x_D))


def reference_moe(moe: MoE, x_BSD: torch.Tensor) -> torch.Tensor:
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    routes = [_ref_route(moe, x) for x in x_TD]
    kept = {(t, e) for t, (ids, _) in enumerate(routes) for e in ids}
    cap = moe.capacity(len(routes))
    if cap is not None:  # each expert keeps its `cap` assignments with the largest gate weights
        kept = set()
        for e in range(moe.config.n_routed_experts):
            mine = [(float(w[ids.index(e)].detach()), t) for t, (ids, w) in enumerate(routes) if e in ids]
            kept |= {(t, e) for _, t in sorted(mine, reverse=True)[:cap]}
    out = []
    for t, (ids, w) in enumerate(routes):
        y = moe.shared_experts(x_TD[t]) if moe.shared_experts is not None else torch.zeros_like(x_TD[t])
        for e, wi in zip(ids, w):
            if (t, e) in kept:
                y = y + wi * _ref_expert(moe, e, x_TD[t])
        out.append(y)
    return torch.stack(out).view_as(x_BSD)


CASES = {
    "sigmoid": dict(),
    "softmax": dict(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=2.0),
    "sigmoid-groups": dict(n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "softmax-groups": dict(scoring_func="softmax", n_group=4, topk_group=3),
    "capacity": dict(capacity_factor=0.6),
    "capacity-groups-softmax": dict(capacity_factor=0.8, scoring_func="softmax", n_group=2, topk_group=1),
    "no-shared": dict(n_shared_experts=0),
}


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "slice-loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_equals_per_token_reference(case, grouped_mm):
    moe = _moe(**CASES[case]).train()
    moe.experts.use_grouped_mm = grouped_mm
    x = torch.randn(2, 12, 16, requires_grad=True)
    upstream = torch.randn(2, 12, 16)
    params = [x, *moe.parameters()]

    got, _, stats = moe(x)
    got_grads = torch.autograd.grad((got * upstream).sum(), params)
    want = reference_moe(moe, x)
    want_grads = torch.autograd.grad((want * upstream).sum(), params)

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert int(stats.counts.sum()) == 24 * moe.config.num_experts_per_tok
    if "capacity" in case:
        assert stats.dropped_frac > 0  # the case really drops


def test_capacity_drops_in_training_only():
    moe = _moe(capacity_factor=0.5)
    x = torch.randn(2, 16, 16)
    cap = moe.train().capacity(32)
    assert cap == math.ceil(0.5 * 32 * 3 / 8)
    with torch.no_grad():
        dropped = moe(x)[2].dropped_frac
        assert moe.eval().capacity(32) is None
        assert moe(x)[2].dropped_frac == 0
    assert dropped > 0


def test_router_stats():
    moe = _moe().eval()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.e_score_correction_bias.zero_()
        _, aux, stats = moe(torch.randn(2, 10, 16))
    assert stats.counts.dtype == torch.long and stats.counts.shape == (8,) and int(stats.counts.sum()) == 60
    assert stats.entropy.item() == pytest.approx(math.log(8), abs=1e-5)  # a uniform router
    assert stats.dropped_frac.item() == 0.0 and aux.item() == 0.0  # eval: no aux loss
    stats.bias.add_(1.0)  # a copy, not the buffer
    assert moe.gate.e_score_correction_bias.abs().sum() == 0


# balancing ---------------------------------------------------------------------------------------------------


def _skewed(moe: MoE, slope: float) -> torch.Tensor:
    """Inputs with x_0 = 1: the router's logit for expert e is slope·(e - 4) plus a per-token random part."""
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)
        moe.gate.weight[:, 0] = slope * (torch.arange(8.0) - 4)
        moe.gate.e_score_correction_bias.zero_()
    x = torch.randn(4, 16, 16)
    x[..., 0] = 1.0
    return x


@pytest.mark.parametrize("seq_aux", [True, False])
@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_aux_loss_uniform_router_is_alpha_and_grows_when_skewed(seq_aux, scoring):
    moe = _moe(aux_loss_alpha=0.01, seq_aux=seq_aux, scoring_func=scoring).train()
    x = torch.randn(4, 16, 16)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.e_score_correction_bias.zero_()
    _, uniform, _ = moe(x)
    assert uniform.item() == pytest.approx(0.01, rel=1e-5)  # Σ f_i = E and P_i = 1/E
    _, skewed, _ = moe(_skewed(moe, slope=2.0))
    assert 0.01 * 1.5 < skewed.item() <= 0.01 * 8 / 3 + 1e-6  # at most α·E/K
    skewed.backward()
    assert moe.gate.weight.grad.abs().sum() > 0  # the loss trains the router


def test_aux_loss_off_is_zero():
    moe = _moe(aux_loss_alpha=0.0).train()
    assert moe(torch.randn(1, 4, 16))[1].item() == 0.0


def test_bias_update_sign_rule():
    config = DeepSeekConfig.from_preset("tiny", bias_update_speed=0.1)
    model = get_model(config)
    counts = [torch.tensor([10, 0, 5, 5]), torch.tensor([1, 1, 1, 1])]
    model.update_router_biases(counts)
    torch.testing.assert_close(
        model.moe_layers()[0].gate.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0, 0])
    )
    assert model.moe_layers()[1].gate.e_score_correction_bias.abs().sum() == 0
    assert "layers.0.mlp.gate.e_score_correction_bias" in model.state_dict()  # saved with checkpoints
    with pytest.raises(ValueError, match="2 MoE layers"):
        model.update_router_biases(counts[:1])


def test_bias_update_moves_skewed_load_towards_balance():
    config = DeepSeekConfig.from_preset(
        "tiny", hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=12,
        num_hidden_layers=1, bias_update_speed=0.01,
    )  # fmt: skip
    model = get_model(config).eval()
    moe = model.moe_layers()[0]
    x = _skewed(moe, slope=0.5)
    with torch.no_grad():
        before = moe(x)[2].counts
        for _ in range(120):  # γ = 0.01: each step moves a bias by 1/100 of the score range
            model.update_router_biases([moe(x)[2].counts])
        after = moe(x)[2].counts
    assert before[:4].sum() < 40 and before[-3:].sum() > 130  # the high experts take most tokens
    assert after.float().std() < 0.2 * before.float().std()  # measured: std 20 -> 1.4
    assert after.min() > 0
