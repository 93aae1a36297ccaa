"""Generation and evaluation: the latent-KV-cache engine, sampling, streaming text, `eval` metrics.

from deepseek_lm.generate import Engine
engine = Engine.from_checkpoint("runs/demo")
print(engine.generate("Once upon a time", max_new_tokens=50, temperature=0.8).text)
"""

from deepseek_lm.generate.engine import Completion, Engine, PromptTruncatedWarning
from deepseek_lm.generate.sampling import SamplingConfig, sample

__all__ = ["Completion", "Engine", "PromptTruncatedWarning", "SamplingConfig", "sample"]
