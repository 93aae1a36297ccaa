"""Hugging Face interop (SPEC §7, issue 6): config mapping and refusals, tokenizer files, export → transformers
parity (logits and greedy generation), transformers-written checkpoints → import, round trip, bad input.

transformers is the independent implementation here; the library itself never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.interop import InteropError, from_hf_config, to_hf_config
from deepseek_lm.interop.hf import write_tokenizer_files

transformers = pytest.importorskip("transformers")

SAMPLE_TEXT = "Hello  world!\n\n  Ünïcödé — 12345, tabs\tand <|endoftext|> a second doc; trailing space "


def tiny(**overrides) -> DeepSeekConfig:
    return DeepSeekConfig.from_preset("tiny", **overrides)


def hf_config_object(hf: dict, tmp_path: Path):
    """What transformers makes of a config.json we wrote."""
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return transformers.AutoConfig.from_pretrained(tmp_path)


def train_tiny_bpe():
    """A byte-level BPE like the data pipeline's (specials first: <|endoftext|> 0, <|pad|> 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT, "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return tok


# ---------------------------------------------------------------------------------------------------------
# config mapping


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_import_defaults_are_transformers_defaults(model_type):
    from deepseek_lm.interop.hf_config import HF_DEFAULTS

    cls = transformers.DeepseekV3Config if model_type == "deepseek_v3" else transformers.DeepseekV2Config
    reference = cls()
    for key, value in HF_DEFAULTS[model_type].items():
        assert getattr(reference, key) == value, key


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # sigmoid, one group, q compressed
        dict(
            n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=2.5, first_k_dense_replace=1
        ),
        dict(q_lora_rank=0, tie_word_embeddings=True, bos_token_id=3, eos_token_id=0, pad_token_id=1),
        dict(
            rope_scaling={
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "beta_fast": 32,
                "beta_slow": 1,
            }
        ),
    ],
)
def test_sigmoid_config_exports_as_deepseek_v3(overrides, tmp_path):
    cfg = tiny(**overrides)
    hf = to_hf_config(cfg)
    loaded = hf_config_object(hf, tmp_path)
    assert type(loaded).__name__ == "DeepseekV3Config"
    assert loaded.architectures == ["DeepseekV3ForCausalLM"]
    for name in [
        "hidden_size",
        "num_hidden_layers",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "routed_scaling_factor",
        "first_k_dense_replace",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "moe_intermediate_size",
        "intermediate_size",
        "rms_norm_eps",
        "max_position_embeddings",
    ]:
        assert getattr(loaded, name) == getattr(cfg, name), name
    assert loaded.q_lora_rank == (cfg.q_lora_rank or None)
    assert loaded.num_key_value_heads == cfg.num_attention_heads
    assert loaded.rope_interleave is True
    assert loaded.rope_parameters["rope_theta"] == cfg.rope_theta
    assert loaded.rope_parameters["rope_type"] == ("yarn" if cfg.rope_scaling else "default")
    assert loaded.num_mtp_layers == 0
    assert loaded.dtype == torch.float32


@pytest.mark.parametrize("groups", [(1, 1), (2, 1)])
def test_exact_softmax_config_exports_as_deepseek_v2(groups, tmp_path):
    cfg = tiny(scoring_func="softmax", norm_topk_prob=False, n_group=groups[0], topk_group=groups[1])
    loaded = hf_config_object(to_hf_config(cfg), tmp_path)
    assert type(loaded).__name__ == "DeepseekV2Config"
    assert loaded.topk_method == ("greedy" if groups == (1, 1) else "group_limited_greedy")
    assert (loaded.n_group, loaded.topk_group) == groups


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(n_group=2, topk_group=1, norm_topk_prob=False, q_lora_rank=0, tie_word_embeddings=True),
        dict(scoring_func="softmax", norm_topk_prob=False, n_group=2, topk_group=1, bias_update_speed=0.0),
        dict(rope_scaling={"factor": 4.0, "original_max_position_embeddings": 64, "mscale_all_dim": 1.0}),
    ],
)
def test_config_round_trip(overrides):
    cfg = tiny(aux_loss_alpha=0.01, seq_aux=False, eos_token_id=0, pad_token_id=1, **overrides)
    assert from_hf_config(to_hf_config(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(scoring_func="softmax", norm_topk_prob=True), "norm_topk_prob"),
        (dict(n_routed_experts=1, num_experts_per_tok=1), "n_routed_experts"),
        (dict(scoring_func="softmax", norm_topk_prob=False, hidden_size=66), "hidden_size"),
        (dict(rope_scaling={"factor": 2.0, "rope_type": "linear"}), "rope_scaling"),
    ],
)
def test_unrepresentable_config_is_refused(overrides, named):
    with pytest.raises(InteropError, match=named) as info:
        to_hf_config(tiny(**overrides))
    assert "\n" not in str(info.value)


def test_transformers_written_config_imports(tmp_path):
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        routed_scaling_factor=1.5,
        eos_token_id=[2, 3],
    )
    hf_cfg.save_pretrained(tmp_path)
    cfg = from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert (cfg.scoring_func, cfg.n_group, cfg.topk_group, cfg.q_lora_rank) == ("sigmoid", 4, 2, 0)
    assert (cfg.routed_scaling_factor, cfg.first_k_dense_replace, cfg.eos_token_id) == (1.5, 1, 2)
    assert cfg.bos_token_id == 0  # transformers' default, written by save_pretrained


def test_legacy_rope_scaling_imports():
    raw = to_hf_config(tiny())
    del raw["rope_parameters"]
    raw |= {
        "rope_theta": 50000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 8.0,
            "mscale": 1.0,
            "original_max_position_embeddings": 32,
        },
    }
    cfg = from_hf_config(raw)
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling == {"factor": 8.0, "mscale": 1.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model_type": "llama"}, "not a DeepSeek checkpoint"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "llama3"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ],
)
def test_unsupported_hf_config_is_refused(change, named):
    raw = to_hf_config(tiny()) | change
    with pytest.raises(InteropError, match=named) as info:
        from_hf_config(raw, "some/config.json")
    assert "some/config.json" in str(info.value) and "\n" not in str(info.value)


def test_unknown_v2_topk_method_is_refused():
    raw = to_hf_config(tiny(scoring_func="softmax", norm_topk_prob=False)) | {"topk_method": "noaux_tc"}
    with pytest.raises(InteropError, match="topk_method"):
        from_hf_config(raw)


# ---------------------------------------------------------------------------------------------------------
# tokenizer files


def test_auto_tokenizer_loads_our_tokenizer(tmp_path):
    tok = train_tiny_bpe()
    cfg = tiny(eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|pad|>"))
    write_tokenizer_files(tok, tmp_path, cfg)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.bos_token) == ("<|endoftext|>", "<|pad|>", None)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (cfg.eos_token_id, cfg.pad_token_id)
    ids = tok.encode(SAMPLE_TEXT).ids
    assert hf_tok(SAMPLE_TEXT)["input_ids"] == ids
    assert hf_tok.decode(ids) == SAMPLE_TEXT
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids)
