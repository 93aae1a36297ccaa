"""The DeepSeek model: MLA + DeepSeekMoE (see transformer.py for the whole decoder)."""

from deepseek_lm.model.block import Block
from deepseek_lm.model.layers import RMSNorm, SwiGLU
from deepseek_lm.model.loss import linear_cross_entropy
from deepseek_lm.model.mla import MLA, LatentCache
from deepseek_lm.model.moe import MoE, RouterStats
from deepseek_lm.model.mtp import MTPModule
from deepseek_lm.model.transformer import DeepSeekLM, ModelOutput, get_model

__all__ = [
    "MLA",
    "Block",
    "DeepSeekLM",
    "LatentCache",
    "MTPModule",
    "MoE",
    "ModelOutput",
    "RMSNorm",
    "RouterStats",
    "SwiGLU",
    "get_model",
    "linear_cross_entropy",
]
