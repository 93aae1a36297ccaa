"""Multi-token prediction (model/mtp.py): the objective against a plain per-depth reference, the modules'
names, counts and initialisation, their MoE layers in the balancing machinery, training with it."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepseek_lm.config import ConfigError, DeepSeekConfig
from deepseek_lm.model import get_model, linear_cross_entropy
from deepseek_lm.model.mla import make_positions


def mtp_config(**overrides) -> DeepSeekConfig:
    return DeepSeekConfig.from_preset("tiny", **{"num_nextn_predict_layers": 2, **overrides})


def reference_mtp(model, ids: torch.Tensor, targets: torch.Tensor):
    """Per depth k, position by position: the module on (h^{k-1}_i, Emb(t_{i+k})) predicts t_{i+k+1}; plain
    F.cross_entropy over full logits. t is the window ids[0], ..., ids[T-1], targets[T-1]."""
    B, T = ids.shape
    tokens = torch.cat((ids, targets[:, -1:]), dim=1)  # t_0 .. t_T (no ignored target in the last column)
    ignored = torch.cat((torch.zeros_like(ids[:, :1], dtype=torch.bool), targets == -100), dim=1)
    h = model(ids, return_hidden=True).hidden  # h^0: the main model's final-normed states
    losses, top1 = [], []
    for k, module in enumerate(model.mtp, start=1):
        n = T - k
        inputs = torch.stack([tokens[:, i + k] for i in range(n)], dim=1)
        wanted = torch.stack([tokens[:, i + k + 1] for i in range(n)], dim=1)
        wanted = wanted.masked_fill(torch.stack([ignored[:, i + k + 1] for i in range(n)], dim=1), -100)
        x = module.eh_proj(torch.cat((module.enorm(model.embed_tokens(inputs)), module.hnorm(h[:, :n])), -1))
        x = x + module.self_attn(module.input_layernorm(x), make_positions(model.rope, B, n, 0, False, n))
        x = x + module.mlp(module.post_attention_layernorm(x))[0]
        h = module.shared_head.norm(x)
        logits = model.lm_head(h)
        losses.append(F.cross_entropy(logits.flatten(0, 1), wanted.flatten(), ignore_index=-100))
        top1.append(((logits.argmax(-1) == wanted) & (wanted != -100)).sum())
    return losses, top1


def test_mtp_losses_equal_a_plain_per_depth_reference():
    model = get_model(mtp_config(vocab_size=64)).train()
    with torch.no_grad():  # a few predictions right, so that the top-1 count is not trivially zero
        model.lm_head.weight.mul_(30)
    ids = torch.randint(0, 64, (3, 12))
    targets = torch.cat((ids[:, 1:], torch.randint(0, 64, (3, 1))), dim=1)
    targets[0, 4] = targets[1, 9] = -100  # ignored targets: ignored at every depth that would predict them
    out = model(ids, targets=targets)
    want_losses, want_top1 = reference_mtp(model, ids, targets)
    for got, want in zip(out.mtp_losses, want_losses, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [int(t) for t in out.mtp_top1] == [int(t) for t in want_top1] and sum(want_top1) > 0
    assert [int(t) for t in out.mtp_tokens] == [3 * 11 - 2, 3 * 10 - 2]
    grads = torch.autograd.grad(sum(out.mtp_losses), list(model.parameters()), allow_unused=True)
    want_grads = torch.autograd.grad(sum(want_losses), list(model.parameters()), allow_unused=True)
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads, strict=True):
        if w is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)
    assert out.loss.item() == pytest.approx(
        model(ids, targets=targets).loss.item()
    )  # `loss` stays the main CE


@pytest.mark.parametrize("grad", [True, False])
def test_top1_count_of_the_chunked_loss(grad):
    h, w = torch.randn(40, 16, requires_grad=grad), torch.randn(50, 16, requires_grad=grad)
    y = torch.randint(0, 50, (40,))
    y[:12] = (h @ w.t()).argmax(-1)[:12]  # some targets are the argmax
    y[3] = -100
    loss, top1 = linear_cross_entropy(h, w, y, chunk_rows=7, count_top1=True)
    logits = h @ w.t()
    assert int(top1) == int(((logits.argmax(-1) == y) & (y != -100)).sum()) >= 11
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, ignore_index=-100), atol=1e-5, rtol=1e-5)


def test_modules_have_deepseek_v3_names_and_join_the_balancing():
    model = get_model(mtp_config(num_hidden_layers=2, first_k_dense_replace=1))
    names = {n for n, _ in model.named_parameters() if n.startswith("mtp.0.")}
    assert {"mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.eh_proj.weight", "mtp.0.shared_head.norm.weight",
            "mtp.0.self_attn.kv_b_proj.weight", "mtp.0.mlp.experts.gate_up_proj"} <= names  # fmt: skip
    assert model.mtp[0].eh_proj.weight.shape == (64, 128)
    assert len(model.moe_layers()) == 1 + 2 and model.moe_layers()[1] is model.mtp[0].mlp
    ids = torch.randint(0, 512, (2, 8))
    out = model.train()(ids, targets=ids)
    assert len(out.router_stats) == 3 and out.aux_loss > model(ids, targets=ids).aux_loss / 2
    model.update_router_biases([s.counts for s in out.router_stats])
    assert model.mtp[1].mlp.gate.e_score_correction_bias.abs().sum() > 0  # moved like the main layers'


def test_initialisation_and_counts_keep_the_modules_apart():
    config = mtp_config(hidden_size=256, moe_intermediate_size=256)
    model, plain = get_model(config), get_model(mtp_config(num_nextn_predict_layers=0))
    p = dict(model.named_parameters())
    assert p["mtp.1.eh_proj.weight"].std().item() == pytest.approx(config.initializer_range, rel=0.05)
    out_sigma = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
    assert p["mtp.0.self_attn.o_proj.weight"].std().item() == pytest.approx(out_sigma, rel=0.05)
    assert all(torch.all(p[f"mtp.1.{n}.weight"] == 1) for n in ("enorm", "hnorm", "shared_head.norm"))
    counts = model.param_counts()
    plain_counts = get_model(
        mtp_config(hidden_size=256, moe_intermediate_size=256, num_nextn_predict_layers=0)
    )
    assert {k: counts[k] for k in ("total", "activated", "embedding")} == {
        k: v for k, v in plain_counts.param_counts().items() if k in ("total", "activated", "embedding")
    }
    block = sum(x.numel() for x in model.layers[0].parameters())
    assert counts["mtp"] == 2 * (block + 2 * 256 * 256 + 3 * 256)  # block, eh_proj, three norms
    assert model.flops_per_token(32) > plain_counts.flops_per_token(32)
    assert plain.param_counts()["mtp"] == 0


def test_invalid_depth_and_too_short_windows():
    with pytest.raises(ConfigError, match="num_nextn_predict_layers must be >= 0"):
        mtp_config(num_nextn_predict_layers=-1)
    model = get_model(mtp_config())
    with pytest.raises(ValueError, match="too short"):
        model(torch.ones(1, 2, dtype=torch.long), targets=torch.ones(1, 2, dtype=torch.long))
