"""Our parameters ↔ the tensors of llama.cpp's `deepseek2` architecture in a GGUF file, both ways, bit-exact.

Read from llama.cpp's loader (src/models/deepseek2.cpp: which tensors, which shapes) and gguf-py's
constants.py (the names, used here through `gguf.TENSOR_NAMES`). Three differences besides the names:
- MLA's up-projection `kv_b_proj` (H·(n + v), r) is stored split, in the layout of the absorbed attention
  llama.cpp runs (queries scored against the cached latents): `attn_k_b` (H, r, n), each head's W_uk
  transposed, and `attn_v_b` (H, v, r), each head's W_uv.
- Routed experts: our fused `gate_up_proj` (E, 2I, D), gate rows first, is `ffn_gate_exps` (E, I, D) and
  `ffn_up_exps` (E, I, D); `down_proj` (E, D, I) is `ffn_down_exps` as it is. (Recent llama.cpp also reads a
  fused `ffn_gate_up_exps`; the split pair is what every llama.cpp since DeepSeek-V2 loads, ollama's and
  LM Studio's included.)
- MTP module k is block L + k - 1, its block tensors named as a main block's plus the `nextn.` ones. Its
  embedding and head are the main model's: llama.cpp falls back to them when the block holds none, so no
  copies are written.
Shapes here are numpy/PyTorch order; GGUF stores the dimensions reversed (ggml's ne), so a PyTorch Linear
weight (out, in) is llama.cpp's {in, out}, as its loader asks.

Legend: H heads, n qk_nope_head_dim, v v_head_dim, r kv_lora_rank, E routed experts, I expert width, D hidden,
L num_hidden_layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from gguf import MODEL_TENSOR as T  # short: the tables below read as llama.cpp's
from gguf import TENSOR_NAMES

from deepseek_lm.config import DeepSeekConfig

# our tensors outside the blocks -> llama.cpp's (a tied head is not written: llama.cpp reuses token_embd)
GLOBAL = {"embed_tokens.weight": (T.TOKEN_EMBD, "weight"), "norm.weight": (T.OUTPUT_NORM, "weight"),
          "lm_head.weight": (T.OUTPUT, "weight")}  # fmt: skip
# our name inside a block (layers.{i}. or mtp.{k}.) -> llama.cpp's tensor, renamed as it is
BLOCK = {
    "input_layernorm.weight": (T.ATTN_NORM, "weight"),
    "self_attn.q_proj.weight": (T.ATTN_Q, "weight"),  # q_lora_rank = 0
    "self_attn.q_a_proj.weight": (T.ATTN_Q_A, "weight"),
    "self_attn.q_a_layernorm.weight": (T.ATTN_Q_A_NORM, "weight"),
    "self_attn.q_b_proj.weight": (T.ATTN_Q_B, "weight"),
    "self_attn.kv_a_proj_with_mqa.weight": (T.ATTN_KV_A_MQA, "weight"),
    "self_attn.kv_a_layernorm.weight": (T.ATTN_KV_A_NORM, "weight"),
    "self_attn.o_proj.weight": (T.ATTN_OUT, "weight"),
    "post_attention_layernorm.weight": (T.FFN_NORM, "weight"),
    "mlp.gate_proj.weight": (T.FFN_GATE, "weight"),  # dense layers (first_k_dense_replace)
    "mlp.up_proj.weight": (T.FFN_UP, "weight"),
    "mlp.down_proj.weight": (T.FFN_DOWN, "weight"),
    "mlp.gate.weight": (T.FFN_GATE_INP, "weight"),
    "mlp.gate.e_score_correction_bias": (T.FFN_EXP_PROBS_B, "bias"),
    "mlp.experts.down_proj": (T.FFN_DOWN_EXP, "weight"),
    "mlp.shared_experts.gate_proj.weight": (T.FFN_GATE_SHEXP, "weight"),
    "mlp.shared_experts.up_proj.weight": (T.FFN_UP_SHEXP, "weight"),
    "mlp.shared_experts.down_proj.weight": (T.FFN_DOWN_SHEXP, "weight"),
    # MTP modules only
    "enorm.weight": (T.NEXTN_ENORM, "weight"),
    "hnorm.weight": (T.NEXTN_HNORM, "weight"),
    "eh_proj.weight": (T.NEXTN_EH_PROJ, "weight"),
    "shared_head.norm.weight": (T.NEXTN_SHARED_HEAD_NORM, "weight"),
}
KV_B = "self_attn.kv_b_proj.weight"  # -> attn_k_b + attn_v_b
GATE_UP = "mlp.experts.gate_up_proj"  # -> ffn_gate_exps + ffn_up_exps
# kept in float32 in a file of any type, as llama.cpp's own tools do: the router, whose logits decide which
# experts run, and its bias (with the norms and every 1-D tensor: its kernels read those as f32)
F32_BASES = {TENSOR_NAMES[t].rsplit(".", 1)[-1] for t in (T.FFN_GATE_INP, T.FFN_EXP_PROBS_B)}
OUR_BLOCK_RE = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_name(tensor: T, suffix: str, block: int | None = None) -> str:
    return TENSOR_NAMES[tensor].format(bid=block) + "." + suffix


def keeps_f32(name: str, tensor: torch.Tensor) -> bool:
    """Whether this GGUF tensor stays float32 whatever the file's type (see F32_BASES)."""
    return tensor.dim() == 1 or name.endswith("norm.weight") or name.split(".")[-2] in F32_BASES


# ---------------------------------------------------------------------------------------------------------
# export


def to_gguf_tensors(
    state: Mapping[str, torch.Tensor], config: DeepSeekConfig, mtp_modules: int
) -> dict[str, torch.Tensor]:
    """Our state_dict as llama.cpp's tensors (contiguous, on the state's device), with the first `mtp_modules` MTP
    modules (blocks L, L + 1, ...) and none of the others."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        block = OUR_BLOCK_RE.match(name)
        if block is None:
            if not (name == "lm_head.weight" and config.tie_word_embeddings):
                out[gguf_name(*GLOBAL[name])] = tensor
            continue
        kind, index, rest = block.group(1), int(block.group(2)), block.group(3)
        if kind == "mtp" and index >= mtp_modules:
            continue
        out |= _block_tensors(
            rest, tensor, index + (config.num_hidden_layers if kind == "mtp" else 0), config
        )
    return {k: v.contiguous() for k, v in out.items()}


def _block_tensors(rest: str, tensor: torch.Tensor, i: int, c: DeepSeekConfig) -> dict[str, torch.Tensor]:
    if rest == KV_B:  # (H·(n + v), r) -> k_b (H, r, n), v_b (H, v, r)
        k_b, v_b = tensor.view(c.num_attention_heads, -1, c.kv_lora_rank).split(
            [c.qk_nope_head_dim, c.v_head_dim], dim=1
        )
        return {
            gguf_name(T.ATTN_K_B, "weight", i): k_b.transpose(1, 2),
            gguf_name(T.ATTN_V_B, "weight", i): v_b,
        }
    if rest == GATE_UP:  # (E, 2I, D) -> gate (E, I, D), up (E, I, D)
        gate, up = tensor.chunk(2, dim=1)
        return {gguf_name(T.FFN_GATE_EXP, "weight", i): gate, gguf_name(T.FFN_UP_EXP, "weight", i): up}
    return {gguf_name(*BLOCK[rest], i): tensor}


# ---------------------------------------------------------------------------------------------------------
# import


def from_gguf_tensors(tensors: Mapping[str, torch.Tensor], config: DeepSeekConfig) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors (float) under our names: k_b and v_b joined into kv_b_proj, the experts' gate and
    up fused. Names and shapes are the caller's to check first (`expected_gguf_shapes`)."""
    ours = {gguf_name(*v): k for k, v in GLOBAL.items()}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        block = GGUF_BLOCK_RE.match(name)
        if block is None:
            state[ours[name]] = tensor
            continue
        i = int(block.group(1))
        prefix = f"layers.{i}." if i < config.num_hidden_layers else f"mtp.{i - config.num_hidden_layers}."
        for rest, joined in _block_params(tensors, name, i, config).items():
            state[prefix + rest] = joined
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _block_params(
    tensors: Mapping[str, torch.Tensor], name: str, i: int, c: DeepSeekConfig
) -> dict[str, torch.Tensor]:
    """Our parameter(s) for GGUF tensor `name` of block i; the second tensor of a pair yields nothing."""
    if name == gguf_name(T.ATTN_K_B, "weight", i):  # k_b (H, r, n), v_b (H, v, r) -> (H·(n + v), r)
        v_b = tensors[gguf_name(T.ATTN_V_B, "weight", i)]
        return {KV_B: torch.cat([tensors[name].transpose(1, 2), v_b], dim=1).flatten(0, 1)}
    if name == gguf_name(T.FFN_GATE_EXP, "weight", i):  # gate, up (E, I, D) -> (E, 2I, D)
        return {GATE_UP: torch.cat([tensors[name], tensors[gguf_name(T.FFN_UP_EXP, "weight", i)]], dim=1)}
    if name in (gguf_name(T.ATTN_V_B, "weight", i), gguf_name(T.FFN_UP_EXP, "weight", i)):
        return {}
    rest = next(k for k, v in BLOCK.items() if gguf_name(*v, i) == name)
    return {rest: tensors[name]}


def expected_gguf_shapes(config: DeepSeekConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a deepseek2 GGUF of `config` (its MTP modules included) with its shape: our model's
    parameters, built on the meta device, put through the export's mapping."""
    from deepseek_lm.model import get_model

    state = get_model(config, device="meta").state_dict()
    return {
        k: tuple(v.shape) for k, v in to_gguf_tensors(state, config, config.num_nextn_predict_layers).items()
    }
