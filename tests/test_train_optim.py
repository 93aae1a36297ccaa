"""AdamW parameter groups and the learning-rate schedule."""

import itertools
import math

import pytest
import torch
from torch import nn

from deepseek_lm.train.config import TrainConfig
from deepseek_lm.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


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
