"""The decoder: shapes, causality, the chunked loss, initialisation, counts, config errors, a tiny overfit."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from deepseek_lm.config import PRESETS, ConfigError, DeepSeekConfig
from deepseek_lm.model import DeepSeekLM, get_model, linear_cross_entropy

PARAMS = {"tiny": 221_120, "seed": 15_840_000, "100m": 105_975_296, "1b": 1_112_356_352}


def test_seed_architecture_parameter_count():
    counts = get_model(DeepSeekConfig()).param_counts()
    assert counts["total"] == 15_840_000
    # 4 layers × (7 - 4) idle routed experts × 3·128·256 weights
    assert counts["activated"] == 15_840_000 - 4 * 3 * 3 * 128 * 256
    assert counts["embedding"] == 49_152 * 128


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameters_on_meta_device(preset):
    config = DeepSeekConfig.from_preset(preset)
    with torch.device("meta"):  # no memory, even for 1b
        model = DeepSeekLM(config)
    assert model.param_counts()["total"] == PARAMS[preset]
    p = dict(model.named_parameters())
    E, D, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    last = config.num_hidden_layers - 1
    assert p[f"layers.{last}.mlp.experts.gate_up_proj"].shape == (E, 2 * inter, D)
    assert p[f"layers.{last}.mlp.experts.down_proj"].shape == (E, D, inter)
    assert p["lm_head.weight"].shape == (config.vocab_size, D)
    if config.first_k_dense_replace:
        assert p["layers.0.mlp.gate_proj.weight"].shape == (config.intermediate_size, D)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_forward_shapes_per_preset(preset):
    """Every preset's real widths, cut to 2 layers and a small vocabulary so the test stays small."""
    config = DeepSeekConfig.from_preset(preset, num_hidden_layers=2, vocab_size=256)
    model = get_model(config)
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids)
    assert out.logits.shape == (2, 8, 256)
    assert len(out.router_stats) == config.n_moe_layers and out.aux_loss.shape == ()
    assert model(ids, last_logits_only=True).logits.shape == (2, 1, 256)
    out = model(ids, targets=ids)
    assert out.logits is None and out.loss.shape == ()


def test_causality(tiny_config):
    model = get_model(tiny_config).eval()
    ids = torch.randint(0, 512, (2, 16))
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % 512
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax(dim=(0, 2)).min() > 1e-4  # every later position sees it


# the chunked loss ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [None, 7, 1000])
def test_linear_cross_entropy_equals_plain(chunk_rows):
    h = torch.randn(50, 24, requires_grad=True)
    w = torch.randn(300, 24, requires_grad=True)
    y = torch.randint(0, 300, (50,))
    y[::4] = -100
    got = linear_cross_entropy(h, w, y, chunk_rows=chunk_rows)
    got_grads = torch.autograd.grad(got * 0.5, (h, w))  # a scaled upstream gradient too
    want = F.cross_entropy(h @ w.t(), y)
    want_grads = torch.autograd.grad(want * 0.5, (h, w))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, wg in zip(got_grads, want_grads):
        torch.testing.assert_close(g, wg, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # the no-grad path gives the same value
        torch.testing.assert_close(
            linear_cross_entropy(h, w, y, chunk_rows=chunk_rows), want, atol=1e-5, rtol=1e-5
        )


def test_linear_cross_entropy_under_bf16_autocast():
    """bf16 matmuls, fp32 softmax and an fp32 sum of the per-chunk weight gradients."""
    h = torch.randn(64, 32, requires_grad=True)
    w = (0.1 * torch.randn(200, 32)).requires_grad_()
    y = torch.randint(0, 200, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, y, chunk_rows=8)
    got_grads = torch.autograd.grad(got, (h, w))
    want = F.cross_entropy(h @ w.t(), y)
    want_grads = torch.autograd.grad(want, (h, w))
    assert got_grads[0].dtype == got_grads[1].dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    for g, wg in zip(got_grads, want_grads):
        torch.testing.assert_close(g, wg, atol=2e-3, rtol=2e-2)


def test_linear_cross_entropy_edge_cases():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    none_valid = linear_cross_entropy(h, w, torch.full((6,), -100))
    assert none_valid.item() == 0.0
    none_valid.backward()
    assert h.grad.abs().sum() == 0
    # only the head trains (a frozen trunk): no gradient is computed for h
    h2 = torch.randn(6, 8)
    loss = linear_cross_entropy(h2, w, torch.randint(0, 20, (6,)))
    loss.backward()
    assert w.grad is not None and h2.grad is None


def test_linear_cross_entropy_exact_for_a_vanishing_target_probability():
    """A target ~200 nats under the best logit: its probability underflows in fp32; the loss stays exact."""
    h = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(40, 16)
    w[3] = -20 * h.detach()[2] / h.detach()[2].norm()  # row 2's logit for token 3: about -20·|h|
    w[7] = 20 * h.detach()[2] / h.detach()[2].norm()
    w.requires_grad_()
    y = torch.tensor([1, 2, 3, 4, -100])
    got = linear_cross_entropy(h, w, y, chunk_rows=2)
    want = F.cross_entropy(h @ w.t(), y)
    assert torch.softmax(h @ w.t(), -1)[2, 3] == 0  # underflowed: -log p alone would be wrong
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    for g, wg in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(g, wg, atol=1e-6, rtol=1e-5)


def test_model_loss_equals_cross_entropy_of_logits(tiny_config):
    model = get_model(tiny_config).eval()
    ids = torch.randint(0, 512, (2, 12))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    loss = model(ids, targets=targets).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten())
    plain.backward()
    torch.testing.assert_close(loss, plain, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    model = get_model(tiny_config).train()
    ids = torch.randint(0, 512, (2, 10))
    out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    for w, p in zip(want, model.parameters()):
        torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-5)


def test_tied_head_shares_the_embedding(tiny_config):
    config = DeepSeekConfig.from_preset("tiny", tie_word_embeddings=True)
    model = get_model(config)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.param_counts()["total"] == PARAMS["tiny"] - 512 * 64
    model(torch.randint(0, 512, (1, 6)), targets=torch.randint(0, 512, (1, 6))).loss.backward()
    assert model.embed_tokens.weight.grad is not None


# initialisation, counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ["get_model", "constructor"])
def test_init_weights_table(build):
    config = DeepSeekConfig.from_preset("tiny", hidden_size=256, moe_intermediate_size=256)
    model = get_model(config) if build == "get_model" else DeepSeekLM(config)
    sigma, out_sigma = config.initializer_range, config.initializer_range / math.sqrt(2 * 2)
    p = dict(model.named_parameters())
    assert p["embed_tokens.weight"].std().item() == pytest.approx(sigma, rel=0.05)
    assert p["layers.0.self_attn.q_a_proj.weight"].std().item() == pytest.approx(sigma, rel=0.05)
    assert p["layers.0.self_attn.o_proj.weight"].std().item() == pytest.approx(out_sigma, rel=0.05)
    assert p["layers.1.mlp.experts.down_proj"].std().item() == pytest.approx(out_sigma, rel=0.05)
    assert p["layers.1.mlp.experts.gate_up_proj"].std().item() == pytest.approx(sigma, rel=0.05)
    assert torch.all(p["norm.weight"] == 1) and torch.all(p["layers.1.self_attn.kv_a_layernorm.weight"] == 1)
    assert torch.all(model.layers[1].mlp.gate.e_score_correction_bias == 0)


def test_meta_device_then_init_weights_equals_get_model(tiny_config):
    with torch.device("meta"):
        model = DeepSeekLM(tiny_config)
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()
    torch.manual_seed(1)
    ref = get_model(tiny_config)
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(model.rope, ref.rope)  # the non-persistent rope tables are recomputed too


def test_meta_device_recipe_keeps_a_tied_head_tied():
    with torch.device("meta"):
        model = DeepSeekLM(DeepSeekConfig.from_preset("tiny", tie_word_embeddings=True))
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_bf16_autocast_training_step(tiny_config, grouped_mm):
    """Mixed dtypes meet in rope, the expert dispatch and the chunked loss; the loss stays near fp32's."""
    model = get_model(tiny_config).train()
    for moe in model.moe_layers():
        moe.experts.use_grouped_mm = grouped_mm
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        fp32 = model(ids, targets=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    assert abs(out.loss.item() - fp32.item()) < 0.05
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_flops_per_token():
    model = get_model(DeepSeekConfig())
    c = model.config
    attn_params_per_layer = 2048 + 2048 + 3072 + 3072 + 16384
    moe_active = 896 + (4 + 1) * 3 * 128 * 256
    matmul = 4 * (attn_params_per_layer + moe_active) + 49_152 * 128
    attn = 4 * 8 * (16 + 16) * 256
    assert model.flops_per_token(256) == 6 * matmul + 6 * attn
    assert model.flops_per_token() == 6 * matmul + 6 * 4 * 8 * 32 * c.max_position_embeddings


# config errors, import cost -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(kv_lora_rank=0), "kv_lora_rank must be > 0"),
        (
            dict(n_routed_experts=4, num_experts_per_tok=5),
            r"num_experts_per_tok \(5\) > n_routed_experts \(4\)",
        ),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim must be even"),
        (dict(n_routed_experts=7, n_group=2), "divisible by n_group"),
        (dict(n_routed_experts=8, n_group=2, topk_group=3), r"topk_group \(3\) > n_group \(2\)"),
        (dict(scoring_func="relu"), "scoring_func must be"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(rope_scaling={"beta_fast": 32}), "rope_scaling needs a 'factor'"),
    ],
)
def test_invalid_configs_raise(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DeepSeekConfig(**overrides)


def test_unknown_preset_raises():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        DeepSeekConfig.from_preset("huge")


def test_import_is_cheap():
    code = (
        "import sys, deepseek_lm; from deepseek_lm import get_model; import deepseek_lm.model; "
        "print(','.join(m for m in ('transformers', 'datasets', 'wandb', 'matplotlib') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


# training -----------------------------------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch(tiny_config):
    """ln(512) = 6.24 at the start; below 0.1 after 100 AdamW steps at lr 1e-2 (measured 0.0006-0.01, seeds 0-2)."""
    model = get_model(tiny_config).train()
    ids = torch.randint(0, 512, (2, 33))
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        out = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        (out.loss + out.aux_loss).backward()
        opt.step()
        model.update_router_biases([s.counts for s in out.router_stats])
    assert out.loss.item() < 0.1
