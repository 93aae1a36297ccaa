"""What the bench records about the machine (CPU, threads, torch, commit, load) and its matmul peak, and
the device helpers every measurement shares."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from deepseek_lm.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available; use cpu or auto")
    return torch.device(name)


def train_dtype(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, repeats: int = 8) -> float:
    """FLOP/s of the best of a few large square matmuls: fp32 on CPU, bf16 on CUDA (what training uses)."""
    from deepseek_lm.train.monitor import measure_matmul_peak

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return measure_matmul_peak(device, dtype, trials=repeats)


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg_1m": os.getloadavg()[0],
        **_git_commit(),
    }
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    return info


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def _git_commit() -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):  # not a checkout (a copied tree): the caller may say
        return {"commit": os.environ.get("DEEPSEEK_LM_COMMIT"), "dirty": None}
    return {"commit": commit, "dirty": dirty}
