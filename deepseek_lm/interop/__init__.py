"""Other engines' formats: transformers' DeepseekV3/V2 directories (SPEC §7) and llama.cpp's GGUF (§11).

    from deepseek_lm.interop import export_gguf, export_hf, import_gguf, import_hf
    export_hf("runs/demo", "hf-out")          # AutoModelForCausalLM / AutoTokenizer .from_pretrained("hf-out")
    import_hf("hf-out", "ckpt")               # back to a deepseek-lm checkpoint, bit-identical weights
    export_gguf("runs/demo", "demo.gguf")     # llama.cpp (llama-cli, llama-server), ollama, LM Studio
    import_gguf("demo.gguf", "ckpt")          # f32 round-trips bit-exactly

One module per format (hf.py, gguf.py) over its name, config and tokenizer mappings. Never imports
transformers or llama.cpp: every file is written directly (GGUF through the small `gguf` package).
"""

from deepseek_lm.interop.common import InteropReport
from deepseek_lm.interop.gguf import export_gguf, import_gguf
from deepseek_lm.interop.hf import export_hf, import_hf
from deepseek_lm.interop.hf_config import InteropError, from_hf_config, hf_model_type, to_hf_config
from deepseek_lm.interop.hf_weights import expected_hf_shapes, from_hf_state_dict, to_hf_state_dict

__all__ = [
    "InteropError",
    "InteropReport",
    "expected_hf_shapes",
    "export_gguf",
    "export_hf",
    "from_hf_config",
    "from_hf_state_dict",
    "hf_model_type",
    "import_gguf",
    "import_hf",
    "to_hf_config",
    "to_hf_state_dict",
]
