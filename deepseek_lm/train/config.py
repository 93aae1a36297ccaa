"""The training configuration: one dataclass, grouped by concept, and the training presets.

`TrainConfig()` is the seed's recipe (micro-batch 4 × accumulation 8, sequence 256, lr 1e-4, 5 epochs, 1000
warmup steps, clipping 0.5, AdamW). A preset names a model preset and overrides of these defaults; the CLI
applies it as defaults, so a YAML file and command-line flags always win over it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from deepseek_lm.config import DeepSeekConfig, dataclass_from_dict
from deepseek_lm.errors import UserError

DEFAULT_PROMPTS = ["The ", "A function that", "Return the", "This module provides"]


@dataclass
class TrainConfig:
    """Training settings (the seed's recipe by default)."""

    # data
    data_dir: str | None = None
    """A directory written by `deepseek-lm prepare`; None: the built-in corpus, prepared on first use."""
    seq_len: int = 256
    """Tokens per training window."""
    micro_batch_size: int = 4
    """Sequences per forward pass, per process."""
    grad_accum_steps: int = 8
    """Micro-batches per optimizer step; global batch = micro-batch × accumulation × processes."""
    chat_packing: bool = True
    """Fine-tuning: pack several conversations into each window (attention never crosses between them, each
    starts at position 0) instead of one conversation per row padded to the batch's longest."""

    # length
    epochs: float = 5.0
    """Passes over the training split; used when max_steps is None."""
    max_steps: int | None = None
    """Optimizer steps; overrides epochs and sets the schedule's length."""
    max_time_minutes: float | None = None
    """Wall-clock budget of this invocation's training loop: stop cleanly (evaluate, save) once exceeded."""
    schedule_by_time: bool = False
    """With max_time_minutes: decay the learning rate over the wall-clock budget instead of over steps, so
    that it reaches its floor when the budget ends however fast the machine (not reproducible step for
    step); max_steps stays an upper bound."""

    # optimizer: AdamW (decoupled weight decay; none on norms, biases, embeddings), or Muon + AdamW
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW everywhere. muon: Muon for the hidden matrices (attention, dense and shared FFN, and
    each routed expert's matrices), AdamW for embeddings, the LM head, norms and the router."""
    lr: float = 1e-4
    """Peak learning rate (AdamW's)."""
    embedding_lr: float | None = None
    """AdamW's peak learning rate for the token embeddings; None: lr. Same schedule."""
    min_lr_ratio: float = 0.1
    """The schedule's floor as a fraction of lr."""
    warmup_steps: int = 1000
    """Linear warmup from 0 to lr."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to lr × min_lr_ratio."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 0.5
    """Clip the global gradient norm to this (0 disables)."""
    muon_lr: float | None = None
    """Muon's peak learning rate; None: train.lr (meant for muon_adjust_lr match_rms_adamw). Same schedule."""
    muon_momentum: float = 0.95
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "match_rms_adamw"
    """Muon's update scale per matrix (torch.optim.Muon's adjust_lr_fn): original sqrt(max(1, rows/cols)),
    or match_rms_adamw 0.2·sqrt(max(rows, cols)), AdamW's update RMS, so that AdamW's lr and decay carry over."""

    # multi-token prediction (models with model.num_nextn_predict_layers > 0)
    mtp_weight: float = 0.3
    """λ: loss = CE + MoE aux + λ · mean over the MTP depths of their CE (DeepSeek-V3: 0.3, later 0.1)."""
    mtp_weight_final: float | None = None
    """λ after mtp_weight_switch of the run: DeepSeek-V3's two-phase schedule is 0.3 then 0.1; None: constant."""
    mtp_weight_switch: float = 10 / 14.8
    """Fraction of the run (steps, or the time budget with schedule_by_time) after which mtp_weight_final
    applies (DeepSeek-V3: after 10T of its 14.8T training tokens)."""

    # precision and speed
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: fp32 on CPU (faster there than bf16), bf16 autocast on GPUs with bf16, fp16 + scaler otherwise."""
    compile: bool = False
    """torch.compile the model (pays off on GPUs for long runs)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30 % more compute)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 (for GPUs; also runs on CPU over gloo)."""
    cpu_processes: int = 1
    """On a CPU, train in this many local processes (DDP over gloo, launched through torchrun's machinery by
    the command itself, the cores shared out between them); micro_batch_size is per process. Ignored on a GPU
    and inside a torchrun job."""
    expert_parallel: int = 1
    """Under torchrun: share each MoE layer's routed experts out over groups of N processes (all-to-all
    dispatch); N divides the process count and n_routed_experts. 1: every process holds every expert."""
    dist_timeout_s: float = 600.0
    """How long a collective may wait for another process before this one fails."""

    # evaluation and samples
    eval_every: int = 500
    """Validate every N optimizer steps (and at the end); 0: only at the end."""
    eval_batches: int = 50
    """Validation batches per periodic evaluation; the final one uses the whole split."""
    sample_every: int = 1000
    """Print samples from the fixed prompts every N steps (and at the end); 0: only at the end."""
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_max_new_tokens: int = 40
    sample_temperature: float = 0.8
    sample_top_k: int = 50

    # checkpoints
    save_every: int = 1000
    """Write a checkpoint every N optimizer steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept besides the best by validation loss."""

    # monitoring
    log_every: int = 10
    """Write a metrics record (and a log line) every N optimizer steps."""
    wandb_project: str | None = None
    """Log to Weights & Biases under this project (never prompts for a login)."""
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """online falls back to offline when no API key is configured."""
    wandb_run_name: str | None = None
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None: measured with a quick matmul at start."""

    seed: int = 1337
    vocab_multiple: int = 64
    """The model's vocabulary is the tokenizer's, padded up to a multiple of this."""

    def __post_init__(self) -> None:
        positive = [
            "seq_len", "micro_batch_size", "grad_accum_steps", "log_every", "keep_last", "expert_parallel",
            "cpu_processes",
        ]  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be > 0 (got {getattr(self, name)})")
        for name in ["warmup_steps", "eval_every", "sample_every", "save_every", "grad_clip", "weight_decay"]:
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0 (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"train.max_steps must be > 0 (got {self.max_steps})")
        if self.mtp_weight < 0 or (self.mtp_weight_final or 0) < 0 or not 0 <= self.mtp_weight_switch <= 1:
            raise UserError(
                "need train.mtp_weight >= 0, train.mtp_weight_final >= 0 and 0 <= train.mtp_weight_switch <= 1 "
                f"(got {self.mtp_weight}, {self.mtp_weight_final}, {self.mtp_weight_switch})"
            )
        if self.embedding_lr is not None and self.embedding_lr <= 0:
            raise UserError(f"train.embedding_lr must be > 0 or None for train.lr (got {self.embedding_lr})")
        if self.muon_lr is not None and self.muon_lr <= 0:
            raise UserError(f"train.muon_lr must be > 0 or None for train.lr (got {self.muon_lr})")
        if not 0 <= self.muon_momentum < 1:
            raise UserError(f"train.muon_momentum must lie in [0, 1) (got {self.muon_momentum})")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"need lr > 0 and 0 <= min_lr_ratio <= 1 (got {self.lr}, {self.min_lr_ratio})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data, "training config", UserError)


# A preset: the model preset it trains, and its overrides of TrainConfig's defaults.
# demo: the seed architecture, 7 minutes of training on 2 CPU cores (final evaluation included), on the
#   built-in corpus (4,096-token BPE). The seed's lr 1e-4 with 1000 warmup steps learns almost nothing in a few
#   hundred steps: after 150 steps of 8 × 128 tokens val loss 6.10 (lr 1e-3), 5.88 (3e-3), 5.86 (6e-3). So lr
#   6e-3, 50 warmup steps, then cosine to 10 % over the time budget (however fast the machine). Measured at a
#   fixed 1,536k tokens (step-scheduled, one thread each, 2026-12-06): AdamW 1.912 bits/byte, Muon 1.829
#   (Muon lr 1.2e-2 and weight decay 0.2 were behind at mid-run, linear decay to 0 gave 1.829 too); 16 × 128
#   tokens per step reach the same 1.828 at those tokens and run 1.27× the tokens/s of 8 × 128 at two
#   threads (5,813 vs 4,577), 32 × 128 no faster (5,606). Round two (2026-12-07): the 16 sequences shared by
#   two one-thread processes (cpu_processes 2, 8 each), and the token embeddings at 10× the rate: at 480
#   steps 1.874 against 1.900 (30×: 1.886). Details: benchmarks/learning/README.md.
# fmt: off
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(model="seed"),
    "demo": dict(
        model="seed", micro_batch_size=8, cpu_processes=2, grad_accum_steps=1, seq_len=128, max_steps=4000,
        max_time_minutes=7.0, schedule_by_time=True, optimizer="muon", lr=6e-3, embedding_lr=6e-2,
        warmup_steps=50, weight_decay=0.1, grad_clip=1.0, eval_every=200, eval_batches=10, sample_every=400,
        save_every=400, log_every=25,
    ),
    "tiny": dict(
        model="tiny", micro_batch_size=4, grad_accum_steps=2, seq_len=32, max_steps=20, lr=3e-3,
        warmup_steps=5, eval_every=10, eval_batches=4, sample_every=0, save_every=10, log_every=1,
        sample_max_new_tokens=8,
    ),
    "100m": dict(
        model="100m", micro_batch_size=16, grad_accum_steps=4, seq_len=1024, epochs=1.0, lr=1e-3,
        warmup_steps=500, grad_clip=1.0, eval_every=250, save_every=500,
    ),
    "1b": dict(
        model="1b", micro_batch_size=8, grad_accum_steps=8, seq_len=2048, epochs=1.0, lr=4e-4,
        warmup_steps=1000, grad_clip=1.0, eval_every=500, save_every=1000, gradient_checkpointing=True,
    ),
}
# fmt: on


def preset_defaults(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config dict, train config dict) of a preset, the starting point before user overrides."""
    if name not in TRAIN_PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(TRAIN_PRESETS)}")
    overrides = dict(TRAIN_PRESETS[name])
    model = DeepSeekConfig.from_preset(overrides.pop("model")).to_dict()
    return model, {**TrainConfig().to_dict(), **overrides}


def padded_vocab(tokenizer_vocab: int, multiple: int) -> int:
    return math.ceil(tokenizer_vocab / multiple) * multiple
