"""`DeepSeekConfig` ↔ Hugging Face `config.json` (DeepseekV3Config / DeepseekV2Config), both ways.

Which transformers class represents a model exactly (read from transformers 5.x `modeling_deepseek_v{2,3}.py`):
- DeepseekV3: sigmoid scores + `e_score_correction_bias` for selection, expert groups scored by the sum of
  their top-2 biased scores, optional `norm_topk_prob`, then `routed_scaling_factor`. Our sigmoid router is
  exactly that; it needs ≥ 2 routed experts per group (the top-2 group score).
- DeepseekV2: softmax scores, no bias, never renormalises the top-k weights (`norm_topk_prob` is ignored),
  groups scored by their best expert (`topk_method="group_limited_greedy"`). Our softmax router equals it only
  with norm_topk_prob=False and an all-zero balancing bias (checked on the weights, see hf_weights.py).
Everything else is refused with a message naming the setting.

Training-only settings need no transformers field and change no output: `capacity_factor` (evaluation never
drops tokens), `bias_update_speed` (the bias itself is a weight), `aux_loss_alpha`, `seq_aux`. They are still
written, as extra keys transformers keeps but ignores (`aux_loss_alpha`, `seq_aux` are DeepSeek's own names),
so that import gives back the config that was exported. `scoring_func` / `topk_method` are written under
DeepSeek's names too: vLLM and llama.cpp read those.
"""

from __future__ import annotations

from typing import Any

from deepseek_lm.config import ConfigError, DeepSeekConfig
from deepseek_lm.errors import UserError


class InteropError(UserError, ValueError):
    """Input that cannot be exported or imported; the message names the setting, file or tensor."""


HF_MODEL_TYPES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}

# Fields with the same name and meaning on both sides.
SHARED_FIELDS = [
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "initializer_range", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace", "intermediate_size", "n_shared_experts",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "routed_scaling_factor",
    "bos_token_id", "eos_token_id", "pad_token_id",
]  # fmt: skip

# transformers 5.x class defaults of every key we read: a config.json may leave any of them out, and then
# transformers uses these (tests check this table against the installed classes).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
        norm_topk_prob=True, hidden_act="silu", max_position_embeddings=4096, initializer_range=0.02,
        rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        rope_interleave=True, attention_bias=False, num_nextn_predict_layers=1,
    ),
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
        rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536,
        n_group=None, n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64,
        routed_scaling_factor=1.0, topk_group=None, topk_method="greedy", norm_topk_prob=False,
        v_head_dim=128, num_experts_per_tok=None, moe_intermediate_size=1407,
    ),
}  # fmt: skip
# Training-only fields, carried as extra config.json keys (see the module docstring).
TRAINING_FIELDS = ["aux_loss_alpha", "seq_aux", "bias_update_speed", "capacity_factor"]
ROPE_THETA_DEFAULT = 10000.0
# The YaRN parameters our rope computes exactly as transformers does (always with a truncated correction
# range, transformers' default `truncate=True`; an explicit `attention_factor` is not ours).
YARN_KEYS = {
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
}


def _yarn_params(params: dict[str, Any], what: str) -> dict[str, Any]:
    """The YaRN keys of a rope dict (its type already removed); an InteropError for anything else."""
    params = dict(params)
    if params.get("truncate", True) is True:
        params.pop("truncate", None)
    unknown = sorted(set(params) - YARN_KEYS)
    if unknown:
        raise InteropError(
            f"{what}: YaRN setting(s) {', '.join(f'{k}={params[k]!r}' for k in unknown)} not supported "
            f"(supported: {', '.join(sorted(YARN_KEYS))})"
        )
    return params


# ---------------------------------------------------------------------------------------------------------
# export: DeepSeekConfig -> config.json


def hf_model_type(config: DeepSeekConfig) -> str:
    """The transformers model type that represents `config` exactly, or an `InteropError` naming why none does."""
    if config.scoring_func == "sigmoid":
        if config.n_routed_experts // config.n_group < 2:
            raise InteropError(
                f"n_routed_experts ({config.n_routed_experts}) / n_group ({config.n_group}) < 2: transformers' "
                "DeepseekV3 scores expert groups by their top-2 experts, so it needs ≥ 2 experts per group"
            )
        return "deepseek_v3"
    if config.norm_topk_prob:
        raise InteropError(
            "scoring_func='softmax' with norm_topk_prob=True has no transformers class: DeepseekV2 never "
            "renormalises the top-k weights and DeepseekV3 scores with sigmoid; train softmax models with "
            "norm_topk_prob=False (or use scoring_func='sigmoid') to export them"
        )
    if config.hidden_size % config.num_attention_heads:
        raise InteropError(
            f"hidden_size ({config.hidden_size}) is not a multiple of num_attention_heads "
            f"({config.num_attention_heads}): transformers' DeepseekV2Config refuses that"
        )
    return "deepseek_v2"


def _rope_parameters(config: DeepSeekConfig) -> dict[str, Any]:
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    yarn = dict(config.rope_scaling)
    kind = yarn.pop("rope_type", yarn.pop("type", "yarn"))
    if kind != "yarn":
        raise InteropError(f"rope_scaling type {kind!r} is not exportable: only YaRN")
    yarn = _yarn_params(yarn, "rope_scaling")
    # transformers requires it; our rope defaults it to the context length
    yarn.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return {"rope_type": "yarn", "rope_theta": config.rope_theta, **yarn}


def to_hf_config(config: DeepSeekConfig, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` of the transformers model that computes what `config` computes.

    Every key is written, special token ids included even when None: a missing key would fall back to the
    transformers class default (bos 0, eos 1 for V3), which is wrong for our tokenizers.
    """
    model_type, rope = hf_model_type(config), _rope_parameters(config)
    hf: dict[str, Any] = {
        "architectures": [HF_MODEL_TYPES[model_type]],
        "model_type": model_type,
        **{name: getattr(config, name) for name in SHARED_FIELDS},
        "q_lora_rank": config.q_lora_rank or None,  # transformers: None = q_proj without compression
        "num_key_value_heads": config.num_attention_heads,  # MLA: every head has its own k and v
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_parameters": rope,
        # the same under transformers 4.x's names (4.x, and tools that read config.json themselves)
        "rope_theta": config.rope_theta,
        "rope_scaling": None
        if rope["rope_type"] == "default"
        else {k: v for k, v in rope.items() if k != "rope_theta"},
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the name transformers < 4.56 reads
        "scoring_func": config.scoring_func,
        **{name: getattr(config, name) for name in TRAINING_FIELDS},
        # the MTP modules, as model.layers.{num_hidden_layers + k - 1} (DeepSeek-V3's README_WEIGHTS.md)
        "num_nextn_predict_layers": config.num_nextn_predict_layers,
    }
    if model_type == "deepseek_v3":
        hf |= {
            "n_group": config.n_group,
            "topk_group": config.topk_group,
            "norm_topk_prob": config.norm_topk_prob,
            "rope_interleave": True,  # our rotary pairs are interleaved, as DeepSeek's weights
            "topk_method": "noaux_tc",  # DeepSeek's name for bias-corrected sigmoid routing (vLLM reads it)
        }
    else:  # deepseek_v2 always rotates interleaved pairs (complex multiplication)
        grouped = config.topk_group < config.n_group
        hf |= {
            "n_group": config.n_group,
            "topk_group": config.topk_group,
            "topk_method": "group_limited_greedy" if grouped else "greedy",
            "norm_topk_prob": False,
            "mlp_bias": False,
        }
    return hf


# ---------------------------------------------------------------------------------------------------------
# import: config.json -> DeepSeekConfig


def _refuse_unsupported(hf: dict[str, Any], model_type: str, source: str) -> None:
    checks = [
        ("hidden_act", hf["hidden_act"] != "silu", "our experts are SwiGLU (silu)"),
        ("attention_bias", bool(hf["attention_bias"]), "our projections have no bias"),
        ("mlp_bias", bool(hf.get("mlp_bias")), "our MLPs have no bias"),
        ("rope_interleave", model_type == "deepseek_v3" and not hf["rope_interleave"],
         "our rotary pairs are interleaved"),
        ("quantization_config", "quantization_config" in hf, "dequantize the weights first"),
        ("num_experts_per_tok", hf["num_experts_per_tok"] is None, "it must be set"),
    ]  # fmt: skip
    for key, bad, why in checks:
        if bad:
            raise InteropError(f"{source}: {key}={hf.get(key)!r} is not supported ({why})")


def _rope_from_hf(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes `rope_parameters`; 4.x configs (and DeepSeek's own) have rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", ROPE_THETA_DEFAULT)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise InteropError(f"{source}: rope type {kind!r} is not supported (only default RoPE and YaRN)")
    return theta, _yarn_params(params, source)


def _routing_from_hf(hf: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    if model_type == "deepseek_v3":  # always sigmoid + bias + top-2 group scores, whatever else it says
        return dict(
            scoring_func="sigmoid", n_group=hf["n_group"] or 1, topk_group=hf["topk_group"] or 1,
            norm_topk_prob=bool(hf["norm_topk_prob"]),
        )  # fmt: skip
    method = hf["topk_method"]
    if method not in ("greedy", "group_limited_greedy"):
        raise InteropError(
            f"{source}: topk_method={method!r} has no DeepseekV2 implementation in transformers "
            "(greedy or group_limited_greedy)"
        )
    grouped = method == "group_limited_greedy"
    return dict(
        scoring_func="softmax",
        n_group=hf["n_group"] if grouped else 1,
        topk_group=hf["topk_group"] if grouped else 1,
        norm_topk_prob=False,  # DeepseekV2 ignores norm_topk_prob: it never renormalises
        bias_update_speed=0.0,  # V2 has no balancing bias: keep it zero (unless the file says otherwise)
    )


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):  # generation configs may list several end ids; ours is one
        return value[0] if value else None
    return value


def from_hf_config(raw: dict[str, Any], source: str = "config.json") -> DeepSeekConfig:
    """Our config for a transformers DeepseekV3/V2 `config.json` (as a dict); `source` names it in errors."""
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise InteropError(
            f"{source} is not a DeepSeek checkpoint (model_type {model_type!r}); "
            f"import reads {' or '.join(HF_MODEL_TYPES)} directories"
        )
    hf = {**HF_DEFAULTS[model_type], **raw}
    _refuse_unsupported(hf, model_type, source)
    rope_theta, rope_scaling = _rope_from_hf(hf, source)
    fields = {name: hf[name] for name in SHARED_FIELDS}
    fields |= dict(
        q_lora_rank=hf["q_lora_rank"] or 0,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        eos_token_id=_first_id(hf["eos_token_id"]),
        # how many MTP layers the weights really hold is for the importer to check (hf.py)
        num_nextn_predict_layers=hf.get("num_nextn_predict_layers") or 0,
        **_routing_from_hf(hf, model_type, source),
    )
    fields |= {name: hf[name] for name in TRAINING_FIELDS if name in hf}
    try:
        return DeepSeekConfig(**fields)
    except ConfigError as e:
        raise InteropError(f"{source}: {e}") from e
