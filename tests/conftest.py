"""Shared test fixtures: the tiny config, deterministic seeds, few threads (CI has 2 cores)."""

import pytest
import torch

from deepseek_lm.config import DeepSeekConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> DeepSeekConfig:
    return DeepSeekConfig.from_preset("tiny")
