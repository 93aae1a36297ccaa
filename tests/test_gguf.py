"""GGUF export and import without llama.cpp: the round trip, the types, bad input, what is refused.

llama.cpp itself reading the files (logits, greedy ids, tokenisation, chat template) is test_gguf_llama_cpp.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _trained_tiny import trained_tiny_checkpoint
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from deepseek_lm.checkpoint import load_checkpoint, save_model_dir
from deepseek_lm.cli import main
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.interop import export_gguf, import_gguf
from deepseek_lm.interop import gguf as gguf_module
from deepseek_lm.interop.gguf_names import expected_gguf_shapes, from_gguf_tensors, to_gguf_tensors
from deepseek_lm.model import get_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def f32_file(trained, tmp_path_factory) -> Path:
    return export_gguf(trained.path, tmp_path_factory.mktemp("gguf") / "tiny.gguf").path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def variant(path: Path, tokenizer=None, **overrides) -> Path:
    """An untrained tiny checkpoint with nonzero router biases and norms."""
    model = get_model(DeepSeekConfig.from_preset("tiny", **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    return save_model_dir(path, model.eval(), tokenizer)


# ---------------------------------------------------------------------------------------------------------
# the mapping


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"q_lora_rank": 0, "first_k_dense_replace": 1},
        {"tie_word_embeddings": True, "num_nextn_predict_layers": 1},
    ],
)
def test_names_round_trip_and_match_the_expected_table(overrides):
    config = DeepSeekConfig.from_preset("tiny", **overrides)
    state = get_model(config).state_dict()
    tensors = to_gguf_tensors(state, config, config.num_nextn_predict_layers)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_gguf_shapes(config)
    back = from_gguf_tensors(tensors, config)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_kv_b_is_split_per_head_for_absorbed_attention():
    """attn_k_b[h] is head h's W_uk transposed (r, n), attn_v_b[h] its W_uv (v, r): as llama.cpp multiplies."""
    config = DeepSeekConfig.from_preset("tiny")
    state = get_model(config).state_dict()
    tensors = to_gguf_tensors(state, config, 0)
    H, n, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    kv_b = state["layers.0.self_attn.kv_b_proj.weight"].view(H, n + v, -1)  # transformers' per-head rows
    assert torch.equal(tensors["blk.0.attn_k_b.weight"][1], kv_b[1, :n].T)
    assert torch.equal(tensors["blk.0.attn_v_b.weight"][1], kv_b[1, n:])
    gate_up = state["layers.0.mlp.experts.gate_up_proj"]  # (E, 2I, D), gate rows first
    assert torch.equal(tensors["blk.0.ffn_gate_exps.weight"], gate_up[:, : config.moe_intermediate_size])


# ---------------------------------------------------------------------------------------------------------
# export and import


def test_f32_round_trip_is_exact(trained, f32_file, tmp_path):
    report = import_gguf(f32_file, tmp_path / "back")
    back = load_checkpoint(report.path)
    before, after = trained.model.state_dict(), back.model.state_dict()
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # router biases and the MTP module included
    assert back.config == trained.config
    assert back.tokenizer.to_str() == trained.tokenizer.to_str()
    assert ChatFormat.for_tokenizer(back.tokenizer, back.chat_template) == ChatFormat.for_tokenizer(
        trained.tokenizer, trained.chat_template
    )


def test_file_layout(trained, f32_file):
    reader = GGUFReader(f32_file)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "deepseek2"
    assert fields["deepseek2.block_count"] == trained.config.num_hidden_layers + 1  # the MTP block
    assert fields["deepseek2.nextn_predict_layers"] == 1
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == trained.tokenizer.token_to_id("<|endoftext|>")
    assert len(fields["tokenizer.ggml.tokens"]) == trained.config.vocab_size  # padded with unused tokens
    assert {t.tensor_type for t in reader.tensors} == {GGMLQuantizationType.F32}
    assert "blk.2.nextn.eh_proj.weight" in {t.name for t in reader.tensors}


@pytest.mark.parametrize("dtype, tolerance", [("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 2e-2)])
def test_other_types_import_close(trained, tmp_path, dtype, tolerance):
    path = export_gguf(trained.path, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype).path
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.attn_norm.weight"] == "F32"  # router, norms
    assert types["blk.0.ffn_gate_exps.weight"] == dtype.upper()
    if dtype == "q8_0":
        assert types["blk.0.attn_k_b.weight"] == "F16"  # rows of 16: no whole q8_0 block
    back = load_checkpoint(import_gguf(path, tmp_path / "back").path)
    for name, weight in trained.model.state_dict().items():
        scale = weight.abs().max().clamp_min(1e-6)
        assert (back.model.state_dict()[name] - weight).abs().max() <= tolerance * scale, name


def test_export_replaces_only_an_earlier_gguf_and_leaves_nothing_half_written(
    trained, f32_file, tmp_path, monkeypatch
):
    out = tmp_path / "model.gguf"
    out.write_bytes(f32_file.read_bytes())
    calls = []

    def failing_encode(name, tensor, dtype):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return real_encode(name, tensor, dtype)

    real_encode = gguf_module._encode
    monkeypatch.setattr(gguf_module, "_encode", failing_encode)
    with pytest.raises(OSError):
        export_gguf(trained.path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left
    assert out.read_bytes() == f32_file.read_bytes()  # the earlier export intact
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    monkeypatch.undo()
    with pytest.raises(Exception, match="not a GGUF file"):
        export_gguf(trained.path, other)
    assert other.read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------
# what llama.cpp cannot compute is refused, in one line


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"scoring_func": "softmax", "n_group": 2, "topk_group": 1, "norm_topk_prob": False}, "topk_group"),
        ({"n_shared_experts": 0}, "n_shared_experts"),
        ({"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 64}}, "mscale"),
        ({}, "no tokenizer.json"),  # llama.cpp loads no GGUF without a vocabulary
    ],
)
def test_unrepresentable_model_is_refused_in_one_line(trained, tmp_path, capsys, overrides, words):
    ckpt = variant(tmp_path / "ckpt", trained.tokenizer if overrides else None, **overrides)
    out = tmp_path / "x.gguf"
    line = one_line_error(capsys, "export", "--checkpoint", str(ckpt), "--format", "gguf", "--out", str(out))
    assert line.startswith("deepseek-lm export: error:") and words in line
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_cli_export_import(trained, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, text, _ = run(
        capsys,
        "export",
        "--checkpoint",
        str(trained.path),
        "--format",
        "gguf",
        "--out",
        str(out),
        "--dtype",
        "bf16",
    )
    assert code == 0 and "deepseek2, bf16" in text and out.is_file()
    code, text, _ = run(capsys, "import", "--gguf", str(out), "--out", str(tmp_path / "ckpt"))
    assert code == 0 and "imported" in text
    assert "q8_0" in one_line_error(
        capsys, "export", "--checkpoint", str(trained.path), "--out", str(tmp_path / "hf"), "--dtype", "q8_0"
    )
    assert "exactly one of --hf" in one_line_error(capsys, "import", "--out", str(tmp_path / "c2"))
    assert "--format hf" in one_line_error(
        capsys, "export", "--checkpoint", str(trained.path), "--format", "gguf", "--out", str(out),
        "--pad-heads-for-vllm",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# bad input to import: one line naming it


def test_another_architecture_is_one_line(tmp_path, capsys):
    path = tmp_path / "llama.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = one_line_error(capsys, "import", "--gguf", str(path), "--out", str(tmp_path / "out"))
    assert str(path) in line and "'llama'" in line and "deepseek2" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.001])
def test_truncated_file_is_one_line(f32_file, tmp_path, capsys, keep):
    path = tmp_path / "cut.gguf"
    data = f32_file.read_bytes()
    path.write_bytes(data[: max(int(len(data) * keep), 4)])
    line = one_line_error(capsys, "import", "--gguf", str(path), "--out", str(tmp_path / "out"))
    assert str(path) in line and "truncated" in line
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_is_one_line(tmp_path, capsys):
    (tmp_path / "x.gguf").write_text("hello")
    line = one_line_error(capsys, "import", "--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o"))
    assert "not a GGUF file" in line
    assert "no such file" in one_line_error(
        capsys, "import", "--gguf", str(tmp_path / "y.gguf"), "--out", "o"
    )


def test_unsupported_quantisation_is_one_line(trained, tmp_path, capsys, monkeypatch):
    """A file with a Q4_0 tensor (as llama.cpp's llama-quantize writes): import names the tensor and type."""
    real_encode = gguf_module._encode

    def q4_embedding(name, tensor, dtype):
        if name != "token_embd.weight":
            return real_encode(name, tensor, dtype)
        from gguf import quants

        return quants.quantize(tensor.float().numpy(), GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0

    monkeypatch.setattr(gguf_module, "_encode", q4_embedding)
    path = export_gguf(trained.path, tmp_path / "q4.gguf").path
    line = one_line_error(capsys, "import", "--gguf", str(path), "--out", str(tmp_path / "out"))
    assert "token_embd.weight" in line and "Q4_0" in line and "Q8_0" in line
    assert not (tmp_path / "out").exists()


def test_our_config_key_carries_what_llama_cpp_has_no_key_for(trained, f32_file):
    fields = {k: f.contents() for k, f in GGUFReader(f32_file).fields.items()}
    ours = json.loads(fields["deepseek_lm.config"])
    assert ours["bias_update_speed"] == trained.config.bias_update_speed
    assert ours["eos_token_id"] == trained.config.eos_token_id
