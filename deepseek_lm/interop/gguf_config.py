"""`DeepSeekConfig` ↔ the metadata of llama.cpp's `deepseek2` architecture in a GGUF file, both ways.

What llama.cpp computes, read from its src/models/deepseek2.cpp and llama-graph.cpp (`build_moe_ffn`):
- MLA runs absorbed, as multi-query attention over the latents: one KV head of key length r + d_rope and value
  length r; `key_length_mla` / `value_length_mla` are the per-head sizes before absorption, and the scores are
  scaled by 1/sqrt(key_length_mla), ours.
- Routing: softmax or sigmoid scores (`expert_gating_func`), the bias `exp_probs_b` added for the choice only,
  expert groups scored by the sum of their top-2 (biased) scores, `expert_weights_norm` renormalises the
  chosen weights, `expert_weights_scale` multiplies them. That is our sigmoid router exactly, and our softmax
  router as long as it does not limit groups (ours scores a softmax group by its best expert, as DeepSeek-V2).
- RoPE on consecutive pairs (llama.cpp's "normal" rope), our interleaved pairs. YaRN as DeepSeek's: llama.cpp
  takes `mscale` equal to `mscale_all_dim` (both scale the scores, neither the rotation).
What llama.cpp has no key for (the training-only settings, the initialisation scale, the special ids as our
config holds them) travels as our own config in `deepseek_lm.config`, JSON, so an import gives back the
config that was exported; llama.cpp ignores the key.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from gguf import ExpertGatingFuncType, GGUFValueType, Keys, RopeScalingType

from deepseek_lm.config import ConfigError, DeepSeekConfig
from deepseek_lm.interop.hf_config import InteropError

ARCH = "deepseek2"
OUR_CONFIG_KEY = "deepseek_lm.config"
U32, F32, BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL
# our field -> llama.cpp's key (for `deepseek2`), for the fields that are one value on both sides
DIRECT: dict[str, tuple[str, GGUFValueType]] = {
    "vocab_size": (Keys.LLM.VOCAB_SIZE, U32),
    "max_position_embeddings": (Keys.LLM.CONTEXT_LENGTH, U32),
    "hidden_size": (Keys.LLM.EMBEDDING_LENGTH, U32),
    "intermediate_size": (Keys.LLM.FEED_FORWARD_LENGTH, U32),
    "first_k_dense_replace": (Keys.LLM.LEADING_DENSE_BLOCK_COUNT, U32),
    "num_attention_heads": (Keys.Attention.HEAD_COUNT, U32),
    "rms_norm_eps": (Keys.Attention.LAYERNORM_RMS_EPS, F32),
    "q_lora_rank": (Keys.Attention.Q_LORA_RANK, U32),  # 0: q_proj without compression
    "kv_lora_rank": (Keys.Attention.KV_LORA_RANK, U32),
    "v_head_dim": (Keys.Attention.VALUE_LENGTH_MLA, U32),
    "qk_rope_head_dim": (Keys.Rope.DIMENSION_COUNT, U32),
    "rope_theta": (Keys.Rope.FREQ_BASE, F32),
    "n_routed_experts": (Keys.LLM.EXPERT_COUNT, U32),
    "num_experts_per_tok": (Keys.LLM.EXPERT_USED_COUNT, U32),
    "n_shared_experts": (Keys.LLM.EXPERT_SHARED_COUNT, U32),
    "moe_intermediate_size": (Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, U32),
    "routed_scaling_factor": (Keys.LLM.EXPERT_WEIGHTS_SCALE, F32),
    "norm_topk_prob": (Keys.LLM.EXPERT_WEIGHTS_NORM, BOOL),
}
# what a GGUF that leaves a key out means to llama.cpp's loader (the others it requires)
LLAMA_CPP_DEFAULTS = {
    "first_k_dense_replace": 0, "q_lora_rank": 0, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
    "intermediate_size": DeepSeekConfig.intermediate_size,  # read only for dense layers
}  # fmt: skip
GATING = {"sigmoid": ExpertGatingFuncType.SIGMOID, "softmax": ExpertGatingFuncType.SOFTMAX}
# our fields that no llama.cpp key holds, carried in OUR_CONFIG_KEY; and rope_scaling, whose keys llama.cpp
# holds but whose optional ones (left to their defaults) our config may leave out
OURS_ONLY = [
    "initializer_range", "aux_loss_alpha", "seq_aux", "bias_update_speed", "capacity_factor",
    "bos_token_id", "eos_token_id", "pad_token_id", "rope_scaling",
]  # fmt: skip


def key(template: str) -> str:
    return template.format(arch=ARCH)


# ---------------------------------------------------------------------------------------------------------
# export


def check_exportable(config: DeepSeekConfig) -> None:
    """An `InteropError` naming the setting when llama.cpp's deepseek2 would not compute `config` exactly."""
    c = config
    if c.scoring_func == "softmax" and c.topk_group < c.n_group:
        raise InteropError(
            "scoring_func='softmax' with group-limited routing (topk_group < n_group): llama.cpp scores an "
            "expert group by its top-2 scores, deepseek-lm's softmax router by its best one; export a model "
            "trained with topk_group = n_group (or scoring_func='sigmoid')"
        )
    if c.n_shared_experts == 0:
        raise InteropError("n_shared_experts=0: llama.cpp's deepseek2 requires at least one shared expert")
    if c.q_lora_rank and c.num_hidden_layers in (26, 27):
        raise InteropError(
            f"num_hidden_layers={c.num_hidden_layers} with q_lora_rank > 0: llama.cpp reads a 26- or 27-layer "
            "deepseek2 as DeepSeek-V2-Lite, whose queries are uncompressed (use q_lora_rank=0 or another depth)"
        )
    rs = c.rope_scaling
    if rs and not (rs.get("mscale_all_dim") and rs.get("mscale") == rs.get("mscale_all_dim")):
        raise InteropError(
            f"rope_scaling mscale={rs.get('mscale')!r}, mscale_all_dim={rs.get('mscale_all_dim')!r}: llama.cpp's "
            "deepseek2 YaRN takes mscale equal to mscale_all_dim (as DeepSeek-V2/V3 set them); set both"
        )


def config_metadata(config: DeepSeekConfig, mtp_modules: int) -> list[tuple[str, Any, GGUFValueType]]:
    """(key, value, type) of every architecture key llama.cpp's deepseek2 loader reads for `config`, with
    the first `mtp_modules` MTP modules as blocks after the main ones, and our own config."""
    c = config
    meta = [(key(k), getattr(c, field), t) for field, (k, t) in DIRECT.items()]
    meta += [
        (key(Keys.LLM.BLOCK_COUNT), c.num_hidden_layers + mtp_modules, U32),
        (key(Keys.LLM.NEXTN_PREDICT_LAYERS), mtp_modules, U32),
        # absorbed MLA is multi-query attention over the latents (see the module docstring)
        (key(Keys.Attention.HEAD_COUNT_KV), 1, U32),
        (key(Keys.Attention.KEY_LENGTH), c.kv_lora_rank + c.qk_rope_head_dim, U32),
        (key(Keys.Attention.VALUE_LENGTH), c.kv_lora_rank, U32),
        (key(Keys.Attention.KEY_LENGTH_MLA), c.qk_head_dim, U32),
        (key(Keys.LLM.EXPERT_GATING_FUNC), int(GATING[c.scoring_func]), U32),
    ]
    if c.topk_group < c.n_group:  # all groups chosen is no grouping (and llama.cpp asserts used < count)
        meta += [(key(Keys.LLM.EXPERT_GROUP_COUNT), c.n_group, U32),
                 (key(Keys.LLM.EXPERT_GROUP_USED_COUNT), c.topk_group, U32)]  # fmt: skip
    meta += _yarn_metadata(c)
    ours = json.dumps({name: getattr(c, name) for name in OURS_ONLY}, sort_keys=True)
    return [*meta, (OUR_CONFIG_KEY, ours, GGUFValueType.STRING)]


def _yarn_metadata(c: DeepSeekConfig) -> list[tuple[str, Any, GGUFValueType]]:
    rs = c.rope_scaling
    if not rs:
        return []
    # llama.cpp divides yarn_log_multiplier by 0.1: it holds 0.1 · mscale_all_dim, as its converter writes
    return [
        (key(Keys.Rope.SCALING_TYPE), RopeScalingType.YARN.value, GGUFValueType.STRING),
        (key(Keys.Rope.SCALING_FACTOR), float(rs["factor"]), F32),
        (key(Keys.Rope.SCALING_ORIG_CTX_LEN), rs.get("original_max_position_embeddings") or c.max_position_embeddings, U32),
        (key(Keys.Rope.SCALING_YARN_BETA_FAST), float(rs.get("beta_fast") or 32), F32),
        (key(Keys.Rope.SCALING_YARN_BETA_SLOW), float(rs.get("beta_slow") or 1), F32),
        (key(Keys.Rope.SCALING_YARN_LOG_MUL), 0.1 * float(rs["mscale_all_dim"]), F32),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# import


def config_from_metadata(meta: dict[str, Any], vocab_rows: int, tied: bool, source: str) -> DeepSeekConfig:
    """Our config for a deepseek2 GGUF's metadata (`meta`: key -> value, as read); `vocab_rows` is the
    embedding's row count (the vocabulary size when no key says it), `tied`: the file has no output.weight."""

    def get(field_or_key: str, default: Any = ...) -> Any:
        k = key(DIRECT[field_or_key][0]) if field_or_key in DIRECT else key(field_or_key)
        if k in meta:
            return meta[k]
        if default is ...:
            raise InteropError(f"{source}: no {k} (llama.cpp's deepseek2 loader requires it)")
        return default

    if key(Keys.Attention.KEY_LENGTH_MLA) not in meta:
        raise InteropError(
            f"{source} is a deepseek2 GGUF from before llama.cpp split MLA's kv_b (no "
            f"{key(Keys.Attention.KEY_LENGTH_MLA)}); convert the model again with a recent llama.cpp"
        )
    fields = {
        name: _exact(get(name, LLAMA_CPP_DEFAULTS.get(name, ...))) for name in DIRECT if name != "vocab_size"
    }
    nextn = get(Keys.LLM.NEXTN_PREDICT_LAYERS, 0)
    gating = get(Keys.LLM.EXPERT_GATING_FUNC, int(ExpertGatingFuncType.SOFTMAX))  # llama.cpp's default
    fields |= dict(
        vocab_size=get("vocab_size", vocab_rows),
        num_hidden_layers=get(Keys.LLM.BLOCK_COUNT) - nextn,
        num_nextn_predict_layers=nextn,
        qk_nope_head_dim=get(Keys.Attention.KEY_LENGTH_MLA) - fields["qk_rope_head_dim"],
        scoring_func=_scoring_func(gating, source),
        n_group=get(Keys.LLM.EXPERT_GROUP_COUNT, 0) or 1,
        topk_group=get(Keys.LLM.EXPERT_GROUP_USED_COUNT, 0) or 1,
        tie_word_embeddings=tied,
        rope_scaling=_yarn_from_metadata(meta, source),
    )
    fields |= _ours_only(meta, source)
    try:
        return DeepSeekConfig(**fields)
    except ConfigError as e:
        raise InteropError(f"{source}: {e}") from e


def _exact(value: Any) -> Any:
    """A float32 key as the decimal it was written from (1e-06, not 9.99999997e-07): the shortest repr that
    reads back as the same float32, so our float64 configs survive the round trip."""
    return float(str(np.float32(value))) if isinstance(value, float | np.floating) else value


def _scoring_func(gating: int, source: str) -> str:
    by_value = {int(v): name for name, v in GATING.items()}
    if gating not in by_value:
        raise InteropError(
            f"{source}: {key(Keys.LLM.EXPERT_GATING_FUNC)}={gating} is not supported (deepseek-lm routes with "
            "softmax (1) or sigmoid (2) scores)"
        )
    return by_value[gating]


def _yarn_from_metadata(meta: dict[str, Any], source: str) -> dict[str, Any] | None:
    kind = meta.get(key(Keys.Rope.SCALING_TYPE), RopeScalingType.NONE.value)
    if kind == RopeScalingType.NONE.value:
        return None
    if kind != RopeScalingType.YARN.value:
        raise InteropError(f"{source}: rope scaling {kind!r} is not supported (only YaRN)")
    if key(Keys.Rope.SCALING_YARN_LOG_MUL) not in meta:  # then llama.cpp scales the rotation and the
        # scores both, which no mscale / mscale_all_dim pair of ours does
        raise InteropError(f"{source}: YaRN without {key(Keys.Rope.SCALING_YARN_LOG_MUL)} is not supported")
    mscale = _exact(meta[key(Keys.Rope.SCALING_YARN_LOG_MUL)] / 0.1)
    return {
        "factor": _exact(meta[key(Keys.Rope.SCALING_FACTOR)]),
        "original_max_position_embeddings": meta[key(Keys.Rope.SCALING_ORIG_CTX_LEN)],
        "beta_fast": _exact(meta.get(key(Keys.Rope.SCALING_YARN_BETA_FAST), 32.0)),
        "beta_slow": _exact(meta.get(key(Keys.Rope.SCALING_YARN_BETA_SLOW), 1.0)),
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }


def _ours_only(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """Our config's fields that llama.cpp has no key for, from OUR_CONFIG_KEY when the file has it (ours)."""
    if OUR_CONFIG_KEY not in meta:
        return {}
    try:
        ours = json.loads(meta[OUR_CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise InteropError(f"{source}: {OUR_CONFIG_KEY} is not valid JSON ({e})") from e
    return {name: ours[name] for name in OURS_ONLY if name in ours}
