"""Parity against transformers' DeepseekV3 / DeepseekV2 (the independent check of our MLA and MoE math).

Each case builds transformers' model from a small random config, scales its weights up so that the logits
are O(1) (with transformers' σ = 0.02 init any two models agree to 1e-5 trivially), maps its state dict into
ours by name and compares logits in fp32 at atol 1e-5.
"""

import pytest
import torch

from deepseek_lm.config import PRESETS, DeepSeekConfig
from deepseek_lm.interop import from_hf_config, to_hf_config
from deepseek_lm.model import DeepSeekLM, get_model
from deepseek_lm.model.hf_names import from_hf_state_dict, to_hf_state_dict

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]')"
)

SMALL = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64,
    q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
    intermediate_size=40, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
)  # fmt: skip


def _randomise(model: torch.nn.Module) -> None:
    """Weights ~ N(0, 1/fan_in) and norms near 1: logits of order one, routing far from uniform."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)


def _compare(hf_model, config: DeepSeekConfig):
    ours = get_model(config).eval()
    missing, unexpected = ours.load_state_dict(from_hf_state_dict(hf_model.state_dict()), strict=False)
    assert not unexpected
    assert all(k.endswith("e_score_correction_bias") for k in missing)  # V2 has no bias: ours stays 0
    ids = torch.randint(0, config.vocab_size, (3, 20))
    with torch.no_grad():
        want = hf_model(ids).logits
        got = ours(ids).logits
    assert want.abs().max() > 2.0  # the comparison is not between trivially small numbers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return ours, ids, want
    if config.scoring_func == "sigmoid":  # and back: our names map onto all of transformers' weights
        hf_model.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)


def _v3(config: DeepSeekConfig):
    hf_cfg = transformers.DeepseekV3Config.from_dict(to_hf_config(config))
    model = transformers.DeepseekV3ForCausalLM._from_config(
        hf_cfg, attn_implementation="sdpa", experts_implementation="eager"
    ).eval()
    _randomise(model)
    with torch.no_grad():  # a bias large enough to change which experts are chosen
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn_like(buf))
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(n_group=4, topk_group=2),
        dict(first_k_dense_replace=1, routed_scaling_factor=2.5),
        dict(first_k_dense_replace=2, n_group=2, topk_group=1, q_lora_rank=0, norm_topk_prob=False),
    ],
    ids=["sigmoid", "groups", "dense-first", "dense-groups-noqlora"],
)
def test_parity_deepseek_v3(overrides):
    config = DeepSeekConfig(**{**SMALL, **overrides})
    ours, ids, want = _compare(_v3(config), config)
    for layer in ours.moe_layers():  # the bias changed which experts were chosen: without it, no parity
        layer.gate.e_score_correction_bias.zero_()
    with torch.no_grad():
        assert (ours(ids).logits - want).abs().max() > 1e-2


def test_parity_v3_yarn():
    rope = dict(
        factor=4.0,
        original_max_position_embeddings=16,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
    config = DeepSeekConfig(**SMALL, rope_scaling=rope)
    _compare(_v3(config), config)


@pytest.mark.parametrize(
    "topk_method,groups", [("greedy", {}), ("group_limited_greedy", dict(n_group=4, topk_group=2))]
)
def test_parity_deepseek_v2_softmax(topk_method, groups):
    small = {k: v for k, v in SMALL.items()}
    hf_cfg = transformers.DeepseekV2Config(
        **small, **groups, topk_method=topk_method, routed_scaling_factor=1.5, first_k_dense_replace=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_key_value_heads=4,
    )  # fmt: skip
    model = transformers.DeepseekV2ForCausalLM._from_config(
        hf_cfg, attn_implementation="sdpa", experts_implementation="eager"
    ).eval()
    _randomise(model)
    config = from_hf_config(hf_cfg.to_dict())
    assert config.scoring_func == "softmax" and not config.norm_topk_prob
    _compare(model, config)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_counts_match_transformers(preset):
    """The seed architecture is 15,840,000 parameters in both; the other presets agree too (meta device)."""
    config = DeepSeekConfig.from_preset(preset)
    with torch.device("meta"):
        hf_model = transformers.DeepseekV3ForCausalLM(
            transformers.DeepseekV3Config.from_dict(to_hf_config(config))
        )
        ours = DeepSeekLM(config)
    hf_total = sum(p.numel() for p in hf_model.parameters())
    assert ours.param_counts()["total"] == hf_total
    assert preset != "seed" or hf_total == 15_840_000
