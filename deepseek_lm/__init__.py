"""deepseek-lm: small DeepSeek-architecture language models (MLA + DeepSeekMoE).

Importing the package is cheap: it pulls in torch and the model, nothing else (no transformers, datasets,
wandb or matplotlib).
"""

from deepseek_lm.config import DeepSeekConfig

__version__ = "0.1.0"
__all__ = ["DeepSeekConfig", "__version__", "get_model"]


def __getattr__(name: str):
    # `get_model` lives with the model; resolved lazily so `from deepseek_lm import DeepSeekConfig` stays light.
    if name == "get_model":
        from deepseek_lm.model import get_model

        return get_model
    raise AttributeError(f"module 'deepseek_lm' has no attribute {name!r}")
