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


def test_library_never_imports_transformers():
    import subprocess
    import sys

    code = (
        "import sys, deepseek_lm.interop, deepseek_lm.interop.cli; assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
    assert loaded.rope_parameters == hf["rope_parameters"]  # the 4.x names written beside it agree
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


# ---------------------------------------------------------------------------------------------------------
# export -> transformers (model-dependent from here on)

from deepseek_lm.checkpoint import load_checkpoint, read_model_state, save_model_dir  # noqa: E402
from deepseek_lm.generate import Engine, SamplingConfig  # noqa: E402
from deepseek_lm.interop import export_hf, import_hf  # noqa: E402
from deepseek_lm.model import get_model  # noqa: E402

# The trained checkpoint exercises a dense first layer, group-limited sigmoid routing, scaling and a
# balancing bias that training moved away from zero.
TRAINED = dict(
    num_hidden_layers=3,
    first_k_dense_replace=1,
    intermediate_size=96,
    n_routed_experts=6,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=1.5,
    bias_update_speed=1e-2,
    num_nextn_predict_layers=1,  # the export carries an MTP layer: transformers' parity holds regardless
)


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> Path:
    """A few dozen steps of the training library on ~60 KB of Python's help topics; its best checkpoint."""
    from pydoc_data.topics import topics

    from deepseek_lm.checkpoint import resolve_checkpoint
    from deepseek_lm.data.preparation import PrepareConfig, prepare
    from deepseek_lm.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    (root / "corpus").mkdir()
    for i, name in enumerate(sorted(topics)[:25]):
        (root / "corpus" / f"{i:03d}.txt").write_text(topics[name])
    prepare(PrepareConfig(data=[str(root / "corpus")], out=str(root / "data"), vocab_size=320))
    cfg = TrainConfig(
        data_dir=str(root / "data"),
        max_steps=30,
        seq_len=32,
        micro_batch_size=8,
        grad_accum_steps=1,
        lr=3e-3,
        warmup_steps=3,
        eval_every=0,
        eval_batches=2,
        sample_every=0,
        peak_flops=1e12,
        device="cpu",
    )
    train(tiny(**TRAINED), cfg, root / "run")
    return resolve_checkpoint(root / "run")


@pytest.fixture(scope="session")
def trained_export(trained_ckpt, tmp_path_factory) -> Path:
    return export_hf(trained_ckpt, tmp_path_factory.mktemp("export") / "hf").path


def randomise(model: torch.nn.Module) -> None:
    """Weights ~ N(0, 1/fan_in), norms near 1, biases large enough to change choices: logits of order one."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * p.shape[-1] ** -0.5
            )
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn_like(buf))


def random_ckpt(tmp_path: Path, *, bias: bool = True, **overrides) -> Path:
    model = get_model(tiny(**overrides))
    randomise(model)
    if not bias:
        for layer in model.moe_layers():
            layer.gate.e_score_correction_bias.zero_()
    return save_model_dir(
        tmp_path / "ckpt", model.eval(), train_tiny_bpe() if model.config.vocab_size >= 300 else None
    )


def assert_same_logits(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int, seq: int = 24) -> None:
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = theirs(ids).logits, ours(ids).logits
    assert want.abs().max() > 1.0  # not a comparison between trivially small numbers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def load_hf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_export_writes_the_hf_layout(trained_export):
    names = sorted(p.name for p in trained_export.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    from safetensors import safe_open

    with safe_open(trained_export / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    # per-expert names, as transformers' save_pretrained writes them (and 4.x, vLLM, llama.cpp read them)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)
    # the MTP module as DeepSeek-V3's layer num_hidden_layers (3) with copies of the shared tensors
    mtp = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "embed_tokens.weight",
           "shared_head.head.weight", "mlp.experts.5.down_proj.weight", "self_attn.kv_b_proj.weight"}  # fmt: skip
    assert {f"model.layers.3.{k}" for k in mtp} <= keys and not any(".layers.4." in k for k in keys)
    with safe_open(trained_export / "model.safetensors", "pt") as f:
        for copy, main in [
            ("embed_tokens.weight", "model.embed_tokens.weight"),
            ("shared_head.head.weight", "lm_head.weight"),
        ]:
            assert torch.equal(f.get_tensor(f"model.layers.3.{copy}"), f.get_tensor(main))
    assert json.loads((trained_export / "config.json").read_text())["num_nextn_predict_layers"] == 1
    generation = json.loads((trained_export / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["bos_token_id"]) == (
        0,
        1,
        None,
    )


def test_trained_export_matches_transformers_logits(trained_ckpt, trained_export):
    ours = load_checkpoint(trained_ckpt).model
    theirs = load_hf(trained_export)
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    assert any(torch.any(b != 0) for n, b in theirs.named_buffers() if n.endswith("e_score_correction_bias"))
    assert_same_logits(ours, theirs, ours.config.vocab_size)


def greedy_both(ours: torch.nn.Module, theirs: torch.nn.Module, tokenizer, prompt: list[int], n: int = 32):
    completion = Engine(ours, tokenizer).generate_ids([prompt], n, sampling=SamplingConfig(temperature=0))[0]
    out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False)  # fmt: skip
    hf_ids = out[0, len(prompt) :].tolist()
    eos = theirs.generation_config.eos_token_id
    if eos in hf_ids:  # transformers keeps the EOS it stopped at; our completion leaves it out
        hf_ids = hf_ids[: hf_ids.index(eos)]
    return completion.token_ids, hf_ids


def test_trained_export_greedy_generation_matches(trained_ckpt, trained_export):
    ckpt = load_checkpoint(trained_ckpt)
    prompt = ckpt.tokenizer.encode("The import statement").ids
    ours, theirs = greedy_both(ckpt.model, load_hf(trained_export), ckpt.tokenizer, prompt)
    assert len(ours) == 32
    assert ours == theirs


def test_trained_export_tokenizer_loads_in_transformers(trained_ckpt, trained_export):
    ours = load_checkpoint(trained_ckpt).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(trained_export)
    assert isinstance(theirs, transformers.PreTrainedTokenizerFast)
    assert (theirs.eos_token, theirs.pad_token, theirs.bos_token) == ("<|endoftext|>", "<|pad|>", None)
    ids = ours.encode(SAMPLE_TEXT).ids
    assert theirs(SAMPLE_TEXT)["input_ids"] == ids
    assert theirs.decode(ids) == SAMPLE_TEXT


def test_export_then_import_is_bit_identical(trained_ckpt, trained_export, tmp_path):
    back = import_hf(trained_export, tmp_path / "back").path
    before, after = read_model_state(trained_ckpt), read_model_state(back)
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert torch.equal(before[name], after[name]), name
    assert load_checkpoint(back).config == load_checkpoint(trained_ckpt).config
    assert (back / "tokenizer.json").read_text() == (trained_ckpt / "tokenizer.json").read_text()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=True),
        dict(q_lora_rank=0, n_shared_experts=0, num_experts_per_tok=1, norm_topk_prob=False),
        dict(
            max_position_embeddings=64,
            rope_scaling={
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        ),
    ],
    ids=["tied", "no-q-lora-no-shared", "yarn"],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' width-0 shared MLP
def test_export_variants_match_transformers(overrides, tmp_path):
    ckpt = random_ckpt(tmp_path, **overrides)
    out = export_hf(ckpt, tmp_path / "hf").path
    ours, theirs = load_checkpoint(ckpt).model, load_hf(out)
    assert_same_logits(ours, theirs, ours.config.vocab_size, seq=40)  # past YaRN's original 16 positions
    if ours.config.tie_word_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    back = import_hf(out, tmp_path / "back").path
    before, after = read_model_state(ckpt), read_model_state(back)
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_random_export_greedy_generation_matches(tmp_path):
    # random weights of order one: a generation that wanders the whole vocabulary, unlike a tiny trained model
    ckpt = load_checkpoint(random_ckpt(tmp_path, vocab_size=320, tie_word_embeddings=True))
    theirs = load_hf(export_hf(ckpt.path, tmp_path / "hf").path)
    ours, hf_ids = greedy_both(ckpt.model, theirs, ckpt.tokenizer, [5, 17, 250, 3])
    assert ours == hf_ids and len(set(ours)) >= 5


@pytest.mark.parametrize("groups", [(1, 1), (2, 1)])
def test_exact_softmax_exports_as_deepseek_v2(groups, tmp_path):
    ckpt = random_ckpt(tmp_path, bias=False, scoring_func="softmax", norm_topk_prob=False,
                       n_group=groups[0], topk_group=groups[1], bias_update_speed=0.0)  # fmt: skip
    out = export_hf(ckpt, tmp_path / "hf").path
    theirs = load_hf(out)
    assert type(theirs).__name__ == "DeepseekV2ForCausalLM"
    ours = load_checkpoint(ckpt).model
    assert_same_logits(ours, theirs, ours.config.vocab_size)


def test_softmax_with_a_trained_bias_is_refused(tmp_path):
    ckpt = random_ckpt(tmp_path, scoring_func="softmax", norm_topk_prob=False)
    with pytest.raises(InteropError, match="e_score_correction_bias is nonzero") as info:
        export_hf(ckpt, tmp_path / "hf")
    assert "\n" not in str(info.value) and not (tmp_path / "hf").exists()


def test_bfloat16_export_loads_in_bfloat16(trained_ckpt, tmp_path):
    out = export_hf(trained_ckpt, tmp_path / "hf", dtype="bfloat16").path
    theirs = load_hf(out)
    assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16
    assert theirs.model.layers[1].mlp.gate.weight.dtype == torch.float32  # routing stays fp32


# ---------------------------------------------------------------------------------------------------------
# transformers-written checkpoints -> import

HF_SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    intermediate_size=40,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=3,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    num_key_value_heads=4,
    bos_token_id=None,
    eos_token_id=2,
    pad_token_id=3,
    n_group=2,
    topk_group=1,
)


def hf_model(cls_name: str, **overrides):
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    model = getattr(transformers, cls_name)(config_cls(**(HF_SMALL | overrides))).eval()
    randomise(model)
    return model


@pytest.mark.parametrize(
    "cls_name, overrides",
    [
        ("DeepseekV3ForCausalLM", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)),
        (
            "DeepseekV3ForCausalLM",
            dict(n_group=1, topk_group=1, norm_topk_prob=False, q_lora_rank=None, tie_word_embeddings=True),
        ),
        ("DeepseekV2ForCausalLM", dict(topk_method="greedy")),
        (
            "DeepseekV2ForCausalLM",
            dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0),
        ),
    ],
    ids=["v3-groups", "v3-tied", "v2-greedy", "v2-groups"],
)
def test_transformers_checkpoint_imports_with_same_logits(cls_name, overrides, tmp_path):
    theirs = hf_model(cls_name, **overrides)
    theirs.save_pretrained(tmp_path / "hf")
    report = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert report.notes and "no tokenizer.json" in report.notes[0]
    ckpt = load_checkpoint(report.path)
    assert ckpt.config.scoring_func == ("sigmoid" if "V3" in cls_name else "softmax")
    assert_same_logits(ckpt.model, theirs, HF_SMALL["vocab_size"])


def test_sharded_transformers_checkpoint_imports(tmp_path):
    theirs = hf_model("DeepseekV3ForCausalLM")
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ckpt = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt").path)
    assert_same_logits(ckpt.model, theirs, HF_SMALL["vocab_size"])


def test_fused_expert_layout_imports(tmp_path):
    """transformers 5's in-memory names (3-D gate_up_proj / down_proj), as other tools may write them."""
    from safetensors.torch import save_file

    theirs = hf_model("DeepseekV3ForCausalLM")
    theirs.config.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in theirs.state_dict().items() if "rotary_emb" not in k}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    ckpt = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt").path)
    assert_same_logits(ckpt.model, theirs, HF_SMALL["vocab_size"])


def test_transformers_directory_with_mtp_layers_imports(tmp_path):
    """transformers' save_pretrained writes no MTP layer (its config still declares one): imported without;
    with DeepSeek-V3-style MTP tensors added (fused experts, as transformers 5 holds them), imported with
    them, equal to the module they came from."""
    from safetensors.torch import load_file, save_file

    theirs = hf_model("DeepseekV3ForCausalLM")
    theirs.save_pretrained(tmp_path / "hf")
    report = import_hf(tmp_path / "hf", tmp_path / "without")
    assert "num_nextn_predict_layers=1 but the weights hold 0 MTP layer(s)" in report.notes[-1]
    assert load_checkpoint(report.path).config.num_nextn_predict_layers == 0
    # an MTP module of the same architecture, written into the directory as layer 3
    ours = load_checkpoint(report.path).model
    config = DeepSeekConfig.from_dict({**ours.config.to_dict(), "num_nextn_predict_layers": 1})
    donor = get_model(config)
    randomise(donor)
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, tensor in donor.mtp[0].state_dict().items():
        state[f"model.layers.3.{name}"] = tensor.contiguous()
    state["model.layers.3.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    back = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "with").path)
    assert back.config.num_nextn_predict_layers == 1
    for name, tensor in donor.mtp[0].state_dict().items():
        assert torch.equal(back.model.mtp[0].state_dict()[name], tensor), name
    assert_same_logits(back.model, theirs, HF_SMALL["vocab_size"])


# ---------------------------------------------------------------------------------------------------------
# bad input: one clear line each


def one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(InteropError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def rewrite_weights(hf_dir: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(hf_dir / "model.safetensors"))
    change(state)
    save_file(state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


def copy_export(trained_export: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(trained_export, tmp_path / "hf"))


def test_import_refuses_a_missing_tensor(trained_export, tmp_path):
    hf = copy_export(trained_export, tmp_path)
    rewrite_weights(hf, lambda s: s.pop("model.layers.2.mlp.experts.1.down_proj.weight"))
    msg = one_line_error(import_hf, hf, tmp_path / "out", match="missing tensor")
    assert "model.layers.2.mlp.experts.1.down_proj.weight" in msg and not (tmp_path / "out").exists()


def test_import_refuses_a_misshaped_tensor(trained_export, tmp_path):
    hf = copy_export(trained_export, tmp_path)
    rewrite_weights(hf, lambda s: s.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(3, 5)}))
    msg = one_line_error(import_hf, hf, tmp_path / "out", match="has shape")
    assert "model.layers.0.self_attn.kv_b_proj.weight" in msg and "(3, 5)" in msg


def test_import_refuses_an_unexpected_tensor(trained_export, tmp_path):
    hf = copy_export(trained_export, tmp_path)
    rewrite_weights(hf, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    one_line_error(import_hf, hf, tmp_path / "out", match="unexpected tensor model.layers.0.mlp.extra.weight")


def test_import_refuses_an_mtp_layer_with_its_own_embedding(trained_export, tmp_path):
    hf = copy_export(trained_export, tmp_path)
    rewrite_weights(hf, lambda s: s["model.layers.3.embed_tokens.weight"].add_(1.0))
    one_line_error(import_hf, hf, tmp_path / "out", match="model.layers.3.embed_tokens.weight differs")


def test_import_refuses_what_is_not_a_deepseek_checkpoint(trained_ckpt, trained_export, tmp_path):
    one_line_error(import_hf, tmp_path / "nowhere", tmp_path / "out", match="no such directory")
    (tmp_path / "empty").mkdir()
    one_line_error(
        import_hf, tmp_path / "empty", tmp_path / "out", match="not a Hugging Face model directory"
    )
    one_line_error(import_hf, trained_ckpt, tmp_path / "out", match="deepseek-lm checkpoint already")
    llama = copy_export(trained_export, tmp_path)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    one_line_error(import_hf, llama, tmp_path / "out", match="not a DeepSeek checkpoint")


def test_import_never_unpickles(trained_export, tmp_path):
    hf = copy_export(trained_export, tmp_path)
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    one_line_error(import_hf, hf, tmp_path / "out", match="pytorch_model.bin is never read")


def test_corrupt_weights_are_named(trained_export, tmp_path):
    hf = copy_export(trained_export, tmp_path)
    (hf / "model.safetensors").write_bytes(b"\x00garbage")
    one_line_error(
        import_hf, hf, tmp_path / "out", match="model.safetensors is missing, corrupt or unreadable"
    )


def test_outputs_never_overwrite_unrelated_directories(trained_ckpt, trained_export, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    one_line_error(export_hf, trained_ckpt, tmp_path / "mine", match="exists and is not empty")
    one_line_error(import_hf, trained_export, tmp_path / "mine", match="exists and is not empty")
    one_line_error(import_hf, trained_export, trained_export, match="is the input directory")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    again = export_hf(trained_ckpt, tmp_path / "again").path
    assert export_hf(trained_ckpt, again).path == again  # an earlier export is replaced


@pytest.mark.parametrize(
    "preset, overrides",
    [("seed", dict(num_nextn_predict_layers=1)), ("tiny", dict(q_lora_rank=0)), ("tiny", {})],
    ids=["seed-mtp", "tiny-no-q-lora", "tiny"],
)
def test_heads_padded_for_vllm_compute_the_same_in_transformers(preset, overrides, tmp_path):
    """--pad-heads-for-vllm: q/k heads of qk_head_dim · 4^k ≥ 32 (16 -> 64, 24 -> 96), v heads as wide, the
    queries scaled by 2^k; transformers' logits on the padded export equal ours on the original."""
    model = get_model(DeepSeekConfig.from_preset(preset, vocab_size=320, **overrides))
    randomise(model)
    ckpt = save_model_dir(tmp_path / "ckpt", model.eval(), train_tiny_bpe())
    out = export_hf(ckpt, tmp_path / "hf", pad_heads=True).path
    hf = json.loads((out / "config.json").read_text())
    qk = model.config.qk_head_dim * (4 if model.config.qk_head_dim >= 8 else 16)
    assert hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"] == hf["v_head_dim"] == qk >= 32
    assert_same_logits(load_checkpoint(ckpt).model, load_hf(out), 320, seq=40)
    back = load_checkpoint(import_hf(out, tmp_path / "back").path).model  # the padded model is ours too
    assert_same_logits(back, load_hf(out), 320)
