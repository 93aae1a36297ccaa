"""Hugging Face interoperability: export to and import from transformers' DeepseekV3/V2 format (SPEC §7).

    from deepseek_lm.interop import export_hf, import_hf
    export_hf("runs/demo", "hf-out")          # AutoModelForCausalLM / AutoTokenizer .from_pretrained("hf-out")
    import_hf("hf-out", "ckpt")               # back to a deepseek-lm checkpoint, bit-identical weights

Never imports transformers: config.json, safetensors and tokenizer files are written directly.
"""

from deepseek_lm.interop.hf import InteropReport, export_hf, import_hf
from deepseek_lm.interop.hf_config import InteropError, from_hf_config, hf_model_type, to_hf_config
from deepseek_lm.interop.hf_weights import expected_hf_shapes, from_hf_state_dict, to_hf_state_dict

__all__ = [
    "InteropError",
    "InteropReport",
    "expected_hf_shapes",
    "export_hf",
    "from_hf_config",
    "from_hf_state_dict",
    "hf_model_type",
    "import_hf",
    "to_hf_config",
    "to_hf_state_dict",
]
