"""transformers' `DeepseekV3ForCausalLM` as the bench runs it (`--compare-hf`): loaded with our weights,
and its compiled generation."""

from __future__ import annotations

from typing import Any

import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("--compare-hf needs transformers: pip install transformers") from None


def load_hf(config: DeepSeekConfig, state: dict, device: torch.device, dtype: torch.dtype | None = None):
    """transformers' DeepseekV3ForCausalLM with its default attention and experts implementations."""
    import transformers

    from deepseek_lm.interop import to_hf_config
    from deepseek_lm.model.hf_names import to_hf_state_dict

    transformers.logging.set_verbosity_error()  # no deprecation chatter in the table
    hf_config = transformers.DeepseekV3Config.from_dict(to_hf_config(config))
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM._from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(state), strict=False)
    if unexpected or [k for k in missing if "rotary_emb" not in k]:  # rope tables are not weights
        raise RuntimeError(f"weights do not map onto transformers' model: {(missing + unexpected)[:3]}")
    model.generation_config.eos_token_id = None  # decode exactly n tokens
    return model.to(dtype) if dtype is not None else model


def compiled_generation(device: torch.device) -> dict[str, Any]:
    """`generate` keywords for transformers' compiled decoding: a static cache, whose forward transformers
    compiles itself (mode reduce-overhead: CUDA graphs on a GPU); on a CPU only when asked to."""
    from transformers import CompileConfig

    compile_config = CompileConfig()
    compile_config._compile_all_devices = device.type == "cpu" or None  # a flag, not an init argument
    # every figure's shapes compile once each (transformers recompiles per cache length): keep them all
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return dict(cache_implementation="static", compile_config=compile_config)
