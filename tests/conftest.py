"""Shared test fixtures: the tiny config, deterministic seeds, few threads (CI has 2 cores)."""

import pytest
import torch

from deepseek_lm.config import DeepSeekConfig

# Tests use tiny tensors: one intra-op thread is faster, and OpenMP threads spin badly on a loaded machine
# (measured: a tiny-model decode step 2.7 ms with 1 thread, 400 ms with 2 while other jobs share the cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> DeepSeekConfig:
    return DeepSeekConfig.from_preset("tiny")
