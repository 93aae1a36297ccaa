"""The mapping to and from Hugging Face transformers' DeepseekV3 (and V2) checkpoints.

Our parameter names are transformers' without the leading `model.` (the LM head is `lm_head.weight` in
both), so weights map by renaming alone. Used by the parity tests and by export/import; the config mapping
lives with export/import (`deepseek_lm.interop.to_hf_config` / `from_hf_config`).
Importing this module does not import transformers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

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
