"""Our state_dict ↔ transformers DeepseekV3/V2 tensor names, both ways, bit-exact.

Our names are transformers' without the leading `model.` (the lm_head is `lm_head.weight` on both sides).
Routed experts are fused on our side: `experts.gate_up_proj` (E, 2I, H) = [gate; up] per expert and
`experts.down_proj` (E, H, I), the same layout as transformers 5's in-memory modules. On disk we write the
per-expert names `experts.{e}.{gate,up,down}_proj.weight`: that is what transformers 5's `save_pretrained`
writes (its conversion mapping splits the fused tensors on save and merges them on load), what
transformers 4.x, vLLM and llama.cpp read, and what DeepSeek's own checkpoints use. Import reads both layouts.

Multi-token-prediction modules (deepseek_lm/model/mtp.py) are written as DeepSeek-V3's checkpoint holds them:
our `mtp.{k-1}.X` is `model.layers.{num_hidden_layers + k - 1}.X`, plus copies of the shared embedding and head
(`embed_tokens.weight`, `shared_head.head.weight`) in that layer, where vLLM loads them from. transformers
does not build these layers and leaves the tensors unused. Import reads them back and checks the copies
against the main tensors.

Legend: E routed experts, I moe_intermediate_size, H hidden_size, L num_hidden_layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.interop.hf_config import InteropError
from deepseek_lm.model.hf_names import HEAD, from_hf_name, to_hf_name

FUSED_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
PER_EXPERT_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
BIAS_RE = re.compile(r"^layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$")
MTP_RE = re.compile(r"^mtp\.(\d+)\.")
LAYER_RE = re.compile(r"^layers\.(\d+)\.")
# where DeepSeek-V3's checkpoint repeats the shared tensors in each MTP layer, and the tensors they copy
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": HEAD}
HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
HF_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# Kept in fp32 whatever the export dtype: transformers keeps these two in fp32 too (routing is fp32 maths).
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], config: DeepSeekConfig, model_type: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Our state_dict as transformers' checkpoint tensors (contiguous, CPU), ready for safetensors."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        name = MTP_RE.sub(lambda m: f"layers.{config.num_hidden_layers + int(m.group(1))}.", name)
        if name == HEAD and config.tie_word_embeddings:
            continue  # transformers ties lm_head to embed_tokens on load; safetensors refuses aliases
        if BIAS_RE.match(name) and model_type == "deepseek_v2":
            _check_bias_zero(name, tensor)
            continue  # DeepseekV2 has no correction bias; all-zero means it never changed a choice
        fused = FUSED_RE.match(name)
        if fused:
            out |= _split_experts(int(fused.group(1)), fused.group(2), tensor)
        else:
            out[to_hf_name(name)] = tensor
    if config.n_shared_experts == 0:  # we build no shared MLP; transformers builds one of width 0
        out |= _empty_shared_experts(config)
    shared = {"model.embed_tokens.weight": state["embed_tokens.weight"]}
    shared[HEAD] = state["embed_tokens.weight" if config.tie_word_embeddings else HEAD]
    for layer in _mtp_layers(config):  # copies: safetensors refuses tensors that share memory
        out |= {f"model.layers.{layer}.{k}": shared[v].clone() for k, v in MTP_SHARED_COPIES.items()}
    return {k: _cast(k, v, dtype) for k, v in out.items()}


def _mtp_layers(config: DeepSeekConfig) -> range:
    """The layer indices of the MTP modules in DeepSeek-V3's layout: right after the main layers."""
    L = config.num_hidden_layers
    return range(L, L + config.num_nextn_predict_layers)


def _empty_shared_experts(config: DeepSeekConfig) -> dict[str, torch.Tensor]:
    H, out = config.hidden_size, {}
    for layer in range(config.first_k_dense_replace, config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.shared_experts"
        out |= {f"{p}.gate_proj.weight": torch.empty(0, H), f"{p}.up_proj.weight": torch.empty(0, H)}
        out[f"{p}.down_proj.weight"] = torch.empty(H, 0)
    return out


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point() and not name.endswith(FP32_SUFFIXES):
        tensor = tensor.to(dtype)
    return tensor.detach().to("cpu").contiguous()


def _check_bias_zero(name: str, bias: torch.Tensor) -> None:
    if torch.any(bias != 0):
        raise InteropError(
            f"{name} is nonzero (softmax routing trained with bias_update_speed > 0): transformers' "
            "DeepseekV2 has no balancing bias, so no transformers class computes this model; train softmax "
            "models with bias_update_speed=0 (or use scoring_func='sigmoid') to export them"
        )


def _split_experts(layer: int, kind: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}.mlp.experts"
    out = {}
    for e in range(fused.shape[0]):
        if kind == "down_proj":  # (E, H, I) -> (H, I) per expert
            out[f"{prefix}.{e}.down_proj.weight"] = fused[e]
        else:  # (E, 2I, H) -> gate (I, H), up (I, H): gate first, as transformers' chunk(2) reads it
            gate, up = fused[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"] = gate
            out[f"{prefix}.{e}.up_proj.weight"] = up
    return out


# ---------------------------------------------------------------------------------------------------------
# import


def normalize_hf_state(
    hf_state: Mapping[str, torch.Tensor], config: DeepSeekConfig, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """transformers' tensors in the on-disk layout `expected_hf_shapes(..., shared_copies=False)` describes:
    fused 3-D experts (as transformers 5 holds them in memory) split per expert; the MTP layers' copies of
    the embedding and head checked against the main ones and dropped; dropped, as transformers drops them on
    load: layers past the config's MTP modules, old `rotary_emb.inv_freq` buffers, and a tied model's
    redundant lm_head."""
    out: dict[str, torch.Tensor] = {}
    last = config.num_hidden_layers + config.num_nextn_predict_layers
    for name, tensor in hf_state.items():
        layer = HF_LAYER_RE.match(name)
        if "rotary_emb." in name or (layer and int(layer.group(1)) >= last):
            continue
        if name == HEAD and config.tie_word_embeddings:
            continue
        if layer and name[layer.end() :] in MTP_SHARED_COPIES:
            _check_copy(name, tensor, hf_state, MTP_SHARED_COPIES[name[layer.end() :]], config, source)
            continue
        fused = HF_FUSED_RE.match(name)
        if fused and tensor.dim() == 3:
            out |= _split_experts(int(fused.group(1)), fused.group(2), tensor)
        else:
            out[name] = tensor
    return out


def _check_copy(name: str, copy: torch.Tensor, hf_state, original: str, config: DeepSeekConfig, source: str):
    """Our MTP modules share the main model's embedding and head: a copy must equal what it copies."""
    if original == HEAD and config.tie_word_embeddings:
        original = "model.embed_tokens.weight"
    main = hf_state.get(original)
    if main is not None and (main.shape != copy.shape or not torch.equal(main, copy.to(main.dtype))):
        raise InteropError(
            f"{source}: {name} differs from {original}; deepseek-lm's MTP modules share the main model's "
            "embedding and head, so it cannot import an MTP layer with its own"
        )


def mtp_layers_present(hf_state: Mapping[str, torch.Tensor], config: DeepSeekConfig) -> int:
    """How many of the config's MTP layers (L, L + 1, ...) the weights hold, counted from the first."""
    layers = {int(m.group(1)) for name in hf_state if (m := HF_LAYER_RE.match(name))}
    return next(
        (k for k, layer in enumerate(_mtp_layers(config)) if layer not in layers), len(_mtp_layers(config))
    )


def from_hf_state_dict(
    hf_state: Mapping[str, torch.Tensor], config: DeepSeekConfig, source: str
) -> dict[str, torch.Tensor]:
    """transformers' tensors under our names: experts fused, a zero bias where V2 has none, no width-0 shared
    experts. Names and shapes are checked by the caller (`expected_hf_shapes`, then the model's own)."""
    state: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[int, str, int], torch.Tensor] = {}
    for hf_name, tensor in normalize_hf_state(hf_state, config, source).items():
        name = from_hf_name(hf_name)
        match = PER_EXPERT_RE.match(name)
        if match:
            per_expert[(int(match.group(1)), match.group(3), int(match.group(2)))] = tensor
        elif not (config.n_shared_experts == 0 and ".mlp.shared_experts." in name):
            state[name] = tensor  # (width-0 shared experts: we build no shared MLP)
    state |= _fuse_experts(per_expert, config, source)
    if config.scoring_func == "softmax":  # a DeepseekV2 checkpoint: no bias; zero changes no routing decision
        for layer in range(
            config.first_k_dense_replace, config.num_hidden_layers + config.num_nextn_predict_layers
        ):
            state.setdefault(
                f"layers.{layer}.mlp.gate.e_score_correction_bias", torch.zeros(config.n_routed_experts)
            )
    L = config.num_hidden_layers  # the MTP layers under our names: layers.{L + j}. -> mtp.{j}.
    return {LAYER_RE.sub(lambda m: _our_layer_prefix(int(m.group(1)), L), k): v for k, v in state.items()}


def _our_layer_prefix(layer: int, L: int) -> str:
    return f"layers.{layer}." if layer < L else f"mtp.{layer - L}."


def _fuse_experts(
    per_expert: Mapping[tuple[int, str, int], torch.Tensor], config: DeepSeekConfig, source: str
) -> dict[str, torch.Tensor]:
    extra = sorted(key for key in per_expert if key[2] >= config.n_routed_experts)
    if extra:
        layer, kind, e = extra[0]
        raise InteropError(
            f"{source}: unexpected tensor model.layers.{layer}.mlp.experts.{e}.{kind}_proj.weight "
            f"(config.json has n_routed_experts={config.n_routed_experts})"
        )
    out = {}
    for layer in sorted({key[0] for key in per_expert}):

        def stack(kind: str, layer: int = layer) -> torch.Tensor:
            try:  # (E, I, H) for gate/up, (E, H, I) for down
                return torch.stack([per_expert[(layer, kind, e)] for e in range(config.n_routed_experts)])
            except KeyError as e:
                missing = f"model.layers.{layer}.mlp.experts.{e.args[0][2]}.{kind}_proj.weight"
                raise InteropError(f"{source}: missing tensor {missing}") from None
            except RuntimeError as e:  # experts of different shapes
                raise InteropError(
                    f"{source}: layer {layer}'s experts' {kind}_proj tensors differ in shape"
                ) from e

        prefix = f"layers.{layer}.mlp.experts"
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack("gate"), stack("up")], dim=1)  # (E, 2I, H)
        out[f"{prefix}.down_proj"] = stack("down")
    return out


# ---------------------------------------------------------------------------------------------------------
# transformers' checkpoint layout, written down independently of our model: export checks what it writes
# against it, import checks what it reads (so errors name transformers' tensors).


def expected_hf_shapes(
    config: DeepSeekConfig, model_type: str, shared_copies: bool = True
) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DeepseekV3/V2ForCausalLM checkpoint for `config`, with its shape (per-expert names),
    with DeepSeek-V3's MTP layers; `shared_copies`: with their copies of the embedding and head."""
    c = config
    H, V = c.hidden_size, c.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        shapes[HEAD] = (V, H)
    for i in range(c.num_hidden_layers):
        shapes |= _block_shapes(c, i, model_type, width_0_shared=True)
    for i in _mtp_layers(c):  # DeepSeek-V3's MTP layers (vLLM's DeepSeekMTP reads them)
        p = f"model.layers.{i}."
        shapes |= _block_shapes(c, i, model_type, width_0_shared=False)
        shapes |= {f"{p}{k}.weight": (H,) for k in ("enorm", "hnorm", "shared_head.norm")}
        shapes[f"{p}eh_proj.weight"] = (H, 2 * H)
        if shared_copies:
            shapes |= {f"{p}{k}": (V, H) for k in MTP_SHARED_COPIES}
    return shapes


def _block_shapes(
    c: DeepSeekConfig, i: int, model_type: str, width_0_shared: bool
) -> dict[str, tuple[int, ...]]:
    """Layer i's tensors. width_0_shared: transformers builds a shared MLP of width 0 when there is none."""
    H, p = c.hidden_size, f"model.layers.{i}."
    shapes = {f"{p}{k}": s for k, s in _attention_shapes(c).items()}
    shapes |= {f"{p}input_layernorm.weight": (H,), f"{p}post_attention_layernorm.weight": (H,)}
    if not c.is_moe_layer(i):
        return shapes | {f"{p}mlp.{k}": s for k, s in _mlp_shapes(H, c.intermediate_size).items()}
    E, I_ = c.n_routed_experts, c.moe_intermediate_size
    shapes[f"{p}mlp.gate.weight"] = (E, H)
    if model_type == "deepseek_v3":
        shapes[f"{p}mlp.gate.e_score_correction_bias"] = (E,)
    for e in range(E):
        shapes |= {f"{p}mlp.experts.{e}.{k}": s for k, s in _mlp_shapes(H, I_).items()}
    if c.n_shared_experts or width_0_shared:
        shared = _mlp_shapes(H, I_ * c.n_shared_experts)  # transformers fuses the shared experts into one MLP
        shapes |= {f"{p}mlp.shared_experts.{k}": s for k, s in shared.items()}
    return shapes


def _attention_shapes(c: DeepSeekConfig) -> dict[str, tuple[int, ...]]:
    H, heads = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank:
        q = {
            "q_a_proj.weight": (c.q_lora_rank, H),
            "q_a_layernorm.weight": (c.q_lora_rank,),
            "q_b_proj.weight": (heads * c.qk_head_dim, c.q_lora_rank),
        }
    else:
        q = {"q_proj.weight": (heads * c.qk_head_dim, H)}
    kv = {
        "kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, H),
        "kv_a_layernorm.weight": (c.kv_lora_rank,),
        "kv_b_proj.weight": (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        "o_proj.weight": (H, heads * c.v_head_dim),
    }
    return {f"self_attn.{k}": s for k, s in (q | kv).items()}


def _mlp_shapes(hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    return {
        "gate_proj.weight": (inner, hidden),
        "up_proj.weight": (inner, hidden),
        "down_proj.weight": (hidden, inner),
    }
