"""Everything a training run holds (`Trainer`), how it is built, and how it is saved and restored.

Build order matters: process group → device → data → model (weights restored before wrapping) → expert
parallelism (each process keeps its slice of the experts) → DDP / FSDP2 → optimizer → scheduler / scaler /
loader states → RNG states last, so nothing after the restore draws from the generators before the first step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError
from deepseek_lm.train import distributed as D
from deepseek_lm.train import expert_parallel as EP
from deepseek_lm.train.config import TrainConfig, padded_vocab
from deepseek_lm.train.optim import build_optimizer, build_scheduler
from deepseek_lm.train.precision import Precision, choose_device, choose_precision


@dataclass
class TrainState:
    """The scalars of a run that resume must restore (the tensors live in the optimizer etc.)."""

    step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    tokens_seen: int = 0
    nonfinite_in_a_row: int = 0
    wandb_id: str | None = None
    train_seconds: float = 0.0  # wall-clock seconds in the training loop, over all invocations


@dataclass
class Trainer:
    model_config: DeepSeekConfig
    cfg: TrainConfig
    run_dir: Path
    dist: D.DistInfo
    device: torch.device
    precision: Precision
    raw_model: nn.Module  # the DeepSeekLM itself (FSDP2 shards it in place): state dicts, router biases, ...
    model: nn.Module  # what the step calls: raw_model, or its DDP / FSDP2 wrapping
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: Any  # its data source: deepseek_lm.data.PreparedData, or ChatData (fine-tuning)
    loader: Any  # deepseek_lm.data.TokenLoader
    total_steps: int
    state: TrainState = field(default_factory=TrainState)
    resumed_from: Path | None = None
    ep: EP.ExpertParallel | None = None  # train.expert_parallel > 1: raw_model holds a slice of the experts
    objective: Any = None  # what a step optimises (loop.NextTokenPrediction's interface); None: next token

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.seq_len * self.cfg.grad_accum_steps * self.dist.world_size

    @property
    def fsdp(self) -> bool:
        return D.is_fsdp(self.model)

    @property
    def sharded(self) -> bool:
        """No process holds the whole model (FSDP2 or expert parallelism): gather it to save or sample."""
        return self.fsdp or self.ep is not None


# ---------------------------------------------------------------------------------------------------------
# data and model


def open_data(cfg: TrainConfig, info: D.DistInfo):
    """The prepared data directory; the built-in corpus is prepared on first use (by rank 0 only)."""
    from deepseek_lm.data import PreparedData, default_data_dir, prepare_builtin

    if cfg.data_dir is not None:
        return PreparedData.open(cfg.data_dir)
    data_dir = Path(default_data_dir())
    if info.is_main:
        prepare_builtin(data_dir)
    D.barrier(info)
    return PreparedData.open(data_dir)


def fit_vocab(config: DeepSeekConfig, data: Any, multiple: int) -> DeepSeekConfig:
    """The tokenizer's vocabulary wins (padded to `multiple` for fast matmuls); special ids come along."""
    manifest = data.manifest
    vocab = padded_vocab(manifest["vocab_size"], multiple)
    return replace(
        config,
        vocab_size=vocab,
        eos_token_id=manifest.get("eot_token_id"),
        pad_token_id=manifest.get("pad_token_id"),
        bos_token_id=manifest.get("bos_token_id"),
    )


def build_model(config: DeepSeekConfig, cfg: TrainConfig, device: torch.device) -> nn.Module:
    from deepseek_lm.model import get_model

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run with this seed
    model = get_model(config, device=device)
    model.train()
    return model


def model_for_run(
    config: DeepSeekConfig,
    cfg: TrainConfig,
    data: Any,
    device: torch.device,
    resume_dir: Path | None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[DeepSeekConfig, nn.Module]:
    """A fresh model sized to the tokenizer, or `config` with `initial_state`'s weights (fine-tuning), or the
    checkpoint's architecture and weights on resume."""
    if resume_dir is not None:
        config, _ = ckpt.read_config_json(resume_dir)
    elif initial_state is None:
        config = fit_vocab(config, data, cfg.vocab_multiple)
    check_vocab(config, data)
    model = build_model(config, cfg, device)
    if resume_dir is not None:
        state = ckpt.read_model_state(resume_dir, device)
        ckpt.load_model_weights(model, state, config, resume_dir / ckpt.MODEL_FILE)
    elif initial_state is not None:
        ckpt.load_model_weights(model, initial_state, config, data.path)
    return config, model


def total_steps(cfg: TrainConfig, loader: Any) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * loader.batches_per_epoch / cfg.grad_accum_steps))


# ---------------------------------------------------------------------------------------------------------
# building


def build_trainer(
    model_config: DeepSeekConfig,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    data_source: Callable[[TrainConfig, D.DistInfo], Any] = open_data,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    customize: Callable[[nn.Module], None] | None = None,
) -> Trainer:
    """Set up a run in `run_dir`; with `resume`, continue from its latest complete checkpoint if any.

    `data_source(cfg, dist)` opens the data once the processes are up: by default the prepared token files
    (`open_data`); fine-tuning passes its conversations, and the weights to start from as `initial_state`.
    `customize(model)` runs on the built model before it is wrapped and the optimizer sees its parameters:
    a hook for experiments that swap a module (benchmarks/learning/study.py swaps MLA for plain attention)."""
    info = D.init_distributed(cfg.device, cfg.dist_timeout_s)
    device = D.local_device(info, choose_device(cfg.device))
    precision = choose_precision(cfg.precision, device)
    run_dir = Path(run_dir)
    data = data_source(cfg, info)
    resume_dir = ckpt.latest_checkpoint(run_dir, training=True) if resume else None
    model_config, raw_model = model_for_run(model_config, cfg, data, device, resume_dir, initial_state)
    if customize is not None:
        customize(raw_model)
    ep = expert_parallel(raw_model, cfg, info, precision)
    model = prepare_model(raw_model, cfg, info, device, precision, ep)
    optimizer = build_optimizer(model, cfg, device.type)
    loader = data.train_loader(
        cfg.seq_len, cfg.micro_batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size
    )
    steps = total_steps(cfg, loader)
    trainer = Trainer(
        model_config, cfg, run_dir, info, device, precision, raw_model, model, optimizer,
        build_scheduler(optimizer, cfg, steps), precision.grad_scaler(), data, loader, steps, ep=ep,
    )  # fmt: skip
    if resume_dir is not None:
        trainer.resumed_from = resume_dir
        restore_trainer_state(trainer, ckpt.read_trainer_state(resume_dir))
    return trainer


def check_vocab(config: DeepSeekConfig, data: Any) -> None:
    if config.vocab_size < data.manifest["vocab_size"]:
        raise UserError(
            f"the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's "
            f"({data.manifest['vocab_size']}) in {data.path}: use the data directory the checkpoint was trained on"
        )


def expert_parallel(
    raw_model: nn.Module, cfg: TrainConfig, info: D.DistInfo, precision: Precision
) -> EP.ExpertParallel | None:
    """With train.expert_parallel > 1: the process groups, and `raw_model` keeps this process's experts."""
    n_experts = raw_model.config.n_routed_experts
    ep = EP.setup(
        cfg.expert_parallel, info.world_size, n_experts, len(raw_model.moe_layers()), precision.name,
        cfg.dist_timeout_s,
    )  # fmt: skip
    if ep is not None:
        EP.shard_experts(raw_model, ep)
    return ep


def prepare_model(
    raw_model: nn.Module,
    cfg: TrainConfig,
    info: D.DistInfo,
    device: torch.device,
    precision: Precision,
    ep: EP.ExpertParallel | None = None,
) -> nn.Module:
    """Gradient checkpointing, torch.compile and DDP / FSDP2, in that order (as torchtitan applies them)."""
    if cfg.gradient_checkpointing:
        raw_model.gradient_checkpointing = True
    if cfg.compile:
        if precision.name != "bf16":
            # torch's meta kernel of _grouped_mm, which compile traces, accepts only bf16 (2.13): other
            # precisions take the experts' per-expert path
            for moe in raw_model.moe_layers():
                moe.experts.use_grouped_mm = False
        # Compile block by block in place: parameter names stay those of the model (no `_orig_mod.`), and
        # each block's graph is reused across layers.
        for layer in [*raw_model.layers, *raw_model.mtp]:
            layer.compile()
    param_dtype = precision.dtype if precision.name != "fp32" else None
    return D.wrap_model(raw_model, info, device, fsdp=cfg.fsdp, param_dtype=param_dtype, ep=ep)


# ---------------------------------------------------------------------------------------------------------
# saving and restoring


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states as bytes and tuples: picklable for the all-gather across ranks and
    loadable with weights_only."""
    name, keys, *rest = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "python": random.getstate(),
        "numpy": (name, keys.tobytes(), *rest),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).numpy().tobytes()
    return state


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(_byte_tensor(state["torch"]))
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"]), device)


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def trainer_state_dict(t: Trainer) -> dict[str, Any]:
    """Everything but the weights; a collective under FSDP2 / DDP (every rank must call it)."""
    return {
        "state": vars(t.state).copy(),
        "optimizer": D.full_optimizer_state(t.raw_model, t.optimizer, t.ep),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "loader": t.loader.state_dict(),
        "rng": D.gather_objects(rng_state(t.device), t.dist),  # one per rank
        "world_size": t.dist.world_size,
    }


def restore_trainer_state(t: Trainer, saved: dict[str, Any]) -> None:
    t.state = TrainState(**saved["state"])
    try:
        D.load_optimizer_state(t.raw_model, t.optimizer, saved["optimizer"], t.ep)
    except (ValueError, KeyError) as e:  # e.g. --train.optimizer changed on --resume
        raise UserError(
            f"{t.resumed_from}: the saved optimizer state does not fit train.optimizer {t.cfg.optimizer} ({e}); "
            "resume with the run's own optimizer settings"
        ) from None
    t.scheduler.load_state_dict(saved["scheduler"])
    t.scaler.load_state_dict(saved["scaler"])
    t.loader.load_state_dict(saved["loader"])
    rng = saved["rng"]
    set_rng_state(rng[t.dist.rank] if len(rng) == t.dist.world_size else rng[0], t.device)


def full_model_state(t: Trainer) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU; a collective when sharded (every rank calls it)."""
    return D.full_model_state(t.raw_model, t.ep)


def save(t: Trainer, *, is_best: bool = False) -> Path | None:
    """Write a checkpoint of the current step (rank 0 writes; every rank takes part in the gathering)."""
    model_state = full_model_state(t)
    trainer_state = trainer_state_dict(t)
    path, error = None, None
    if t.dist.is_main:
        try:
            path = ckpt.save_training_checkpoint(
                t.run_dir, t.state.step, model_state, t.model_config, trainer_state,
                tokenizer=t.data.tokenizer, train_config=t.cfg.to_dict(),
                is_best=is_best, keep_last=t.cfg.keep_last, chat_template=t.data.chat_template,
            )  # fmt: skip
        except ckpt.CheckpointError as e:
            error = str(e)
    error = D.broadcast_object(error, t.dist)  # a failed write stops every rank, not only rank 0
    if error is not None:
        raise ckpt.CheckpointError(error)
    return path
