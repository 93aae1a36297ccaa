"""AdamW parameter groups, Muon (batched over experts = torch's Muon per matrix), the combined optimizer's
resume, and the learning-rate schedule."""

import copy
import itertools
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from deepseek_lm.model import DeepSeekLM
from deepseek_lm.train.config import TrainConfig
from deepseek_lm.train.optim import (
    CombinedOptimizer,
    ExpertMuon,
    build_optimizer,
    build_scheduler,
    lr_factor,
    newton_schulz,
    param_groups,
)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8, bias=True)
        self.norm_weight = nn.Parameter(torch.ones(8))
        self.register_buffer("e_score_correction_bias", torch.zeros(4))
        self.lm_head = nn.Linear(8, 16, bias=False)


def test_no_decay_on_norms_biases_embeddings_and_no_buffers():
    m = Small()
    decay, no_decay = param_groups(m, 0.1)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(m.proj.weight), id(m.lm_head.weight)}
    assert ids(no_decay) == {id(m.embed_tokens.weight), id(m.proj.bias), id(m.norm_weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_embedding_lr_puts_the_embedding_in_its_own_group_on_the_schedule(tiny_config):
    m = Small()
    decay, no_decay, embedding = param_groups(m, 0.1, embedding_lr=0.06)
    assert embedding["params"] == [m.embed_tokens.weight]
    assert embedding["lr"] == 0.06 and embedding["weight_decay"] == 0.0
    assert all(p is not m.embed_tokens.weight for p in decay["params"] + no_decay["params"])
    model = DeepSeekLM(tiny_config)
    cfg = TrainConfig(optimizer="muon", lr=1e-3, embedding_lr=1e-2, warmup_steps=2, max_steps=10)
    opt = build_optimizer(model, cfg, "cpu")
    scheduler = build_scheduler(opt, cfg, 10)
    opt.step()
    scheduler.step()
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.embed_tokens.weight)] == pytest.approx(10 * by_param[id(model.lm_head.weight)])


def test_tied_head_counted_once_and_not_decayed():
    m = Small()
    m.lm_head.weight = m.embed_tokens.weight
    decay, no_decay = param_groups(m, 0.1)
    assert sum(p is m.embed_tokens.weight for p in decay["params"] + no_decay["params"]) == 1
    assert all(p is not m.embed_tokens.weight for p in decay["params"])


def test_optimizer_is_fused_or_foreach_adamw():
    opt = build_optimizer(Small(), TrainConfig(), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")


def test_warmup_then_cosine_to_the_floor():
    f = lambda s: lr_factor(s, warmup=10, total=110, decay="cosine", floor=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(109) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    values = [f(s) for s in range(10, 110)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_linear_and_constant():
    assert lr_factor(109, warmup=10, total=110, decay="linear", floor=0.2) == pytest.approx(0.2)
    assert lr_factor(59, warmup=10, total=110, decay="linear", floor=0.0) == pytest.approx(1 - 49 / 99)
    assert lr_factor(100, warmup=10, total=110, decay="constant", floor=0.2) == 1.0


def test_scheduler_follows_the_factor_and_round_trips():
    cfg = TrainConfig(lr=1e-2, warmup_steps=3, min_lr_ratio=0.1)
    opt = build_optimizer(Small(), cfg, "cpu")
    sched = build_scheduler(opt, cfg, total_steps=20)
    for step in range(7):
        assert opt.param_groups[0]["lr"] == pytest.approx(
            1e-2 * lr_factor(step, warmup=3, total=20, decay="cosine", floor=0.1)
        )
        opt.step()
        sched.step()
    opt2 = build_optimizer(Small(), cfg, "cpu")
    sched2 = build_scheduler(opt2, cfg, total_steps=20)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()


# ---------------------------------------------------------------------------------------------------------
# Muon


def muon_kwargs(adjust: str) -> dict:
    return dict(lr=0.05, weight_decay=0.1, momentum=0.9, adjust_lr_fn=adjust)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_expert_muon_equals_torch_muon_on_each_expert_matrix(adjust):
    # gate_up (E, 2I, D) as two matrices per expert (gate, up), down (E, D, I) as one: each stepped by torch's
    # Muon on its own must give the same parameters as the batched steps (tall and wide matrices both)
    E, inter, D = 3, 8, 6
    gate_up, down = nn.Parameter(torch.randn(E, 2 * inter, D)), nn.Parameter(torch.randn(E, D, inter))
    gates = [nn.Parameter(gate_up.data[e, :inter].clone()) for e in range(E)]
    ups = [nn.Parameter(gate_up.data[e, inter:].clone()) for e in range(E)]
    downs = [nn.Parameter(down.data[e].clone()) for e in range(E)]
    initial = down.data.clone()
    batched = ExpertMuon([{"params": [gate_up], "blocks": 2}, {"params": [down]}], **muon_kwargs(adjust))
    reference = torch.optim.Muon(gates + ups + downs, **muon_kwargs(adjust))
    for _ in range(3):
        gate_up.grad, down.grad = torch.randn_like(gate_up), torch.randn_like(down)
        for e in range(E):
            gates[e].grad, ups[e].grad = gate_up.grad[e, :inter].clone(), gate_up.grad[e, inter:].clone()
            downs[e].grad = down.grad[e].clone()
        batched.step()
        reference.step()
    torch.testing.assert_close(gate_up.data, torch.stack([torch.cat([g, u]) for g, u in zip(gates, ups)]))
    torch.testing.assert_close(down.data, torch.stack(list(downs)))
    assert (down.data - initial).abs().min() > 0  # the steps moved every weight


def test_newton_schulz_orthogonalises():
    # singular values of the result lie near 1 (the quintic's fixed band, ~0.7-1.2), whatever the input's scale
    G = torch.randn(4, 24, 16) * torch.tensor([1e-3, 1.0, 10.0, 1e3])[:, None, None]
    s = torch.linalg.svdvals(newton_schulz(G).float())
    assert s.min() > 0.5 and s.max() < 1.3


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_config):
    model = DeepSeekLM(replace(tiny_config, first_k_dense_replace=1))  # a dense layer, then a MoE layer
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), "cpu")
    assert isinstance(opt, CombinedOptimizer)
    adamw, muon, experts = opt.parts
    names = {id(p): n for n, p in model.named_parameters()}
    on = lambda part: {names[id(p)] for g in part.param_groups for p in g["params"]}  # noqa: E731
    assert on(adamw) == {
        n for n, p in model.named_parameters() if p.ndim == 1 or n.startswith(("embed_tokens", "lm_head"))
    } | {"layers.1.mlp.gate.weight"}
    assert "layers.0.mlp.gate_proj.weight" in on(muon) and "layers.1.self_attn.o_proj.weight" in on(muon)
    assert "layers.1.mlp.shared_experts.up_proj.weight" in on(muon)
    assert [(g["blocks"], [names[id(p)] for p in g["params"]]) for g in experts.param_groups] == [
        (1, ["layers.1.mlp.experts.down_proj"]),
        (2, ["layers.1.mlp.experts.gate_up_proj"]),
    ]
    assert len(on(adamw) | on(muon) | on(experts)) == len(list(model.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 0.02, 0.02, 0.02]
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups[2:])


def test_combined_optimizer_schedules_every_part_and_resumes_exactly(tiny_config):
    cfg = TrainConfig(optimizer="muon", lr=1e-2, warmup_steps=2, weight_decay=0.1)
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))

    def run(model, opt, sched, steps):
        for _ in range(steps):
            model(x, targets=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()

    def build():
        torch.manual_seed(0)
        model = DeepSeekLM(tiny_config)
        opt = build_optimizer(model, cfg, "cpu")
        return model, opt, build_scheduler(opt, cfg, total_steps=6)

    straight = build()
    run(*straight, 6)
    first = build()
    run(*first, 3)
    assert [g["lr"] for g in first[1].param_groups] == [1e-2 * first[2].lr_lambdas[0](3)] * 5
    saved = copy.deepcopy((first[0].state_dict(), first[1].state_dict(), first[2].state_dict()))
    resumed = build()
    for obj, state in zip(resumed, saved):
        obj.load_state_dict(state)
    assert resumed[1].parts[1].state is resumed[1].state  # the parts still share the loaded state
    run(*resumed, 3)
    a, b = straight[0].state_dict(), resumed[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_state_of_another_layout_is_refused(tiny_config):
    model = DeepSeekLM(tiny_config)
    adamw_state = build_optimizer(model, TrainConfig(), "cpu").state_dict()
    with pytest.raises(ValueError, match="parameter groups"):
        build_optimizer(model, TrainConfig(optimizer="muon"), "cpu").load_state_dict(adamw_state)
