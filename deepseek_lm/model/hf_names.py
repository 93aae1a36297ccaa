"""The mapping to and from Hugging Face transformers' DeepseekV3 (and V2) checkpoints.

Our parameter names are transformers' without the leading `model.` (the LM head is `lm_head.weight` in
both), so weights map by renaming alone. Used by the parity tests and by export/import.
Importing this module does not import transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from deepseek_lm.config import DeepSeekConfig

HF_PREFIX = "model."
HEAD = "lm_head.weight"


def to_hf_name(name: str) -> str:
    return name if name == HEAD else HF_PREFIX + name


def from_hf_name(name: str) -> str:
    if name == HEAD:
        return name
    if not name.startswith(HF_PREFIX):
        raise KeyError(f"not a DeepseekV3/V2 causal-LM weight name: {name!r}")
    return name[len(HF_PREFIX) :]


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_hf_name(k): v for k, v in state.items()}


def from_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename; drops transformers' non-weight buffers (rotary inv_freq) and MTP layers it does not load."""
    return {from_hf_name(k): v for k, v in state.items() if "rotary_emb" not in k}


def _rope_parameters(config: DeepSeekConfig) -> dict[str, Any]:
    if not config.rope_scaling:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {"rope_type": "yarn", "rope_theta": config.rope_theta, **config.rope_scaling}


def hf_config_dict(config: DeepSeekConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.DeepseekV3Config` with our architecture (sigmoid routing)."""
    if config.scoring_func != "sigmoid":
        raise ValueError("DeepseekV3 routes with sigmoid scores; a softmax-routed model has no V3 equivalent")
    same = [
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank",
        "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok",
        "first_k_dense_replace", "norm_topk_prob", "max_position_embeddings", "initializer_range",
        "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ]  # fmt: skip
    out = {k: getattr(config, k) for k in same}
    out.update(
        num_key_value_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank or None,
        hidden_act="silu",
        rope_parameters=_rope_parameters(config),
        rope_interleave=True,
        attention_bias=False,
    )
    return out


def config_from_hf(hf: Mapping[str, Any]) -> DeepSeekConfig:
    """A DeepSeekConfig from a transformers DeepseekV3/V2 `config.json` dict (model_type decides routing)."""
    is_v2 = hf.get("model_type") == "deepseek_v2"
    keep = set(DeepSeekConfig.__dataclass_fields__) - {"rope_scaling", "rope_theta", "scoring_func"}
    kw = {k: v for k, v in hf.items() if k in keep and v is not None}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # transformers allows a list of ids
        if isinstance(kw.get(k), list):
            kw[k] = kw[k][0] if kw[k] else None
    kw["q_lora_rank"] = hf.get("q_lora_rank") or 0
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kw["rope_theta"] = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    kw["rope_scaling"] = rope if rope_type == "yarn" else None
    if is_v2:  # softmax scores, no renormalisation; "greedy" top-k is one group
        kw.update(scoring_func="softmax", norm_topk_prob=False)
        if hf.get("topk_method", "greedy") == "greedy":
            kw.update(n_group=1, topk_group=1)
    return DeepSeekConfig(**kw)
