"""Device and precision choice: fp32 on CPU, bf16 autocast on GPUs with bf16, fp16 + gradient scaling else.

On CPUs without native bf16 matmul units (this project's AMD EPYC test machine) bf16 autocast is far
slower than fp32: a 1024² matmul ran at 0.3 GFLOP/s in bf16 against ~25 GFLOP/s in fp32, and a training
step of the seed model (8 × 128 tokens) took 8.8 s against 0.28 s. So `auto` picks fp32 on CPU;
`precision: bf16` remains available for CPUs with AMX / AVX512-BF16.
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
