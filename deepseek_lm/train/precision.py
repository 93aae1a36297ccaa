"""Device and precision choice: fp32 on CPU, bf16 autocast on GPUs with bf16, fp16 + gradient scaling else.

On a CPU `auto` picks fp32. On this project's AMD EPYC dev VM (AVX512-BF16, no AMX) oneDNN's bf16 products
run ~2× its fp32 ones, casts included, yet a bf16 autocast step of the demo took 0.99× the fp32 step's time at
one thread (2026-12-07; SDPA's bf16 backward and the casts eat the gain); an earlier torch ran bf16 products
at 0.3 GFLOP/s here. `precision: bf16` remains available.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from deepseek_lm.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str  # cpu | cuda

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none.
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but no CUDA device is available; use cpu or auto")
    return device


def choose_precision(requested: str, device: torch.device) -> Precision:
    if requested == "auto":
        if device.type != "cuda":
            return Precision("fp32", device.type)
        return Precision("bf16" if torch.cuda.is_bf16_supported() else "fp16", "cuda")
    if requested == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return Precision(requested, device.type)
