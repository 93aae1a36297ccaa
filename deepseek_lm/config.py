"""The model configuration: one typed dataclass, its presets, validation and JSON round trip.

Field names follow Hugging Face's `DeepseekV3Config` wherever a field means the same thing, so that export
is a renaming, not a translation. Fields transformers has no name for (`scoring_func`, the balancing knobs)
use DeepSeek's own names from the original `ModelArgs` / DeepSeek-V2 config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deepseek_lm.errors import UserError


@dataclass
class DeepSeekConfig:
    """The seed architecture by default (SPEC §3); `DeepSeekConfig.from_preset(name)` for the others."""

    # vocabulary and trunk
    vocab_size: int = 49152  # at run time the tokenizer's size wins, padded up to a multiple of 64
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    max_position_embeddings: int = 2048  # the context length
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    # mla: q = W_uq RMSNorm(W_dq x) (or W_q x when q_lora_rank is 0); [c_kv, k_pe] = W_dkv x
    q_lora_rank: int = 16
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 8
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16

    # rope: interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's weights and transformers' rope_interleave
    rope_theta: float = 10000.0
    # YaRN context extension, off by default; keys as transformers' rope_parameters: factor,
    # original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim
    rope_scaling: dict[str, Any] | None = None

    # dense ffn for the first `first_k_dense_replace` layers (SwiGLU)
    first_k_dense_replace: int = 0
    intermediate_size: int = 512

    # moe: shared experts always on + top-k of the routed experts, each a SwiGLU of moe_intermediate_size
    n_shared_experts: int = 1
    n_routed_experts: int = 7
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 256
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"  # V3 / V2; always computed in fp32
    n_group: int = 1  # group-limited routing: experts in n_group groups, tokens pick topk_group groups
    topk_group: int = 1
    norm_topk_prob: bool = True  # renormalise the k gate weights to sum to 1 (before scaling)
    routed_scaling_factor: float = 1.0

    # load balancing (SPEC §3), combinable
    aux_loss_alpha: float = 1e-4  # 0 disables the auxiliary loss
    seq_aux: bool = True  # DeepSeek-V3's sequence-wise aux loss; False = expert-level over the batch
    bias_update_speed: float = 1e-3  # γ of auxiliary-loss-free balancing; 0 disables the bias
    capacity_factor: float | None = None  # None = dropless; else capacity = factor × even share (training)

    # multi-token prediction (DeepSeek-V3 §2.2, model/mtp.py): module k predicts the token k + 1 ahead with
    # one block of its own; a training objective and the drafter of self-speculative decoding. 0 = none
    num_nextn_predict_layers: int = 0

    # special tokens (from the tokenizer; carried for export and generation)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # derived values -------------------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return max(self.num_hidden_layers - self.first_k_dense_replace, 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # validation -----------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `ConfigError` with a message a user understands for the first inconsistency found."""
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
            "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size", "n_group", "topk_group",
        ]  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 (got {getattr(self, name)})")
        for name in [
            "q_lora_rank", "qk_nope_head_dim", "n_shared_experts", "first_k_dense_replace",
            "num_nextn_predict_layers",
        ]:  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even for RoPE (got {self.qk_rope_head_dim})")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise ConfigError("intermediate_size must be > 0 when first_k_dense_replace > 0")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"scoring_func must be 'sigmoid' or 'softmax' (got {self.scoring_func!r})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) > n_routed_experts ({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) > n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) > experts in the chosen groups "
                f"(topk_group {self.topk_group} × {per_group} per group)"
            )
        if self.n_group > 1 and self.scoring_func == "sigmoid" and per_group < 2:
            raise ConfigError(
                "sigmoid group routing scores a group by its top-2 experts: use ≥ 2 experts per group"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(
                f"capacity_factor must be > 0 or None for dropless (got {self.capacity_factor})"
            )
        for name in ["aux_loss_alpha", "bias_update_speed", "routed_scaling_factor", "rms_norm_eps"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.rope_scaling is not None and "factor" not in self.rope_scaling:
            raise ConfigError("rope_scaling needs a 'factor' (YaRN), e.g. {'factor': 4.0, ...}")

    # presets and JSON -------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DeepSeekConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeepSeekConfig:
        return dataclass_from_dict(cls, data, "model config", ConfigError)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DeepSeekConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from e


def dataclass_from_dict(cls: type, data: dict[str, Any], what: str, error: type[Exception]) -> Any:
    """`cls(**data)`, refusing keys `cls` does not have with one line that names them."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise error(f"unknown {what} key(s): {', '.join(unknown)}")
    return cls(**data)


class ConfigError(UserError, ValueError):
    """An invalid model configuration (a `ValueError`, so library users can catch it as one)."""


# Presets are plain overrides of the seed defaults. Sizes with the 49,152-token vocabulary:
#   tiny  ≈ 0.1 M (tests; vocabulary 512), seed 15.84 M, 100m ≈ 106 M, 1b ≈ 1.1 B (GPU presets,
#   DeepSeek-V3 proportions: a dense first layer, fine-grained experts, group-limited sigmoid routing).
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    ),
    "seed": {},
    "100m": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=2048,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        first_k_dense_replace=1, intermediate_size=1536,
        n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
        n_group=4, topk_group=2, routed_scaling_factor=2.5,
    ),
    "1b": dict(
        hidden_size=1536, num_hidden_layers=16, num_attention_heads=16, max_position_embeddings=4096,
        q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        first_k_dense_replace=1, intermediate_size=4096,
        n_shared_experts=1, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=384,
        n_group=4, topk_group=2, routed_scaling_factor=2.5,
    ),
}
# fmt: on
