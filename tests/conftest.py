"""Shared test fixtures: the tiny config, deterministic seeds, few threads (CI has 2 cores)."""

import os

import pytest
import torch

from deepseek_lm.config import DeepSeekConfig

# Tests use tiny tensors: one intra-op thread is faster, and OpenMP threads spin badly on a loaded machine
# (measured: a tiny-model decode step 2.7 ms with 1 thread, 400 ms with 2 while other jobs share the cores).
torch.set_num_threads(1)
# Engines decode eagerly here (subprocesses too): a compiled step costs ~1 min to build on 2 cores per
# configuration, so the tests that check it (test_aot.py) ask for it and share one disk cache.
os.environ["DEEPSEEK_LM_AOT"] = "0"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> DeepSeekConfig:
    return DeepSeekConfig.from_preset("tiny")
