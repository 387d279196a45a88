"""Shared fixtures: tiny models that keep the suite fast on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

from models.config import ModelConfig, preset
from models.consistency import ConsistencyModel

torch.set_num_threads(1)  # the suite runs servers and subprocesses beside it on 2 cores


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give zero-initialised layers random weights, so outputs depend on every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture
def tiny_config() -> ModelConfig:
    return preset("digits").replace(model_channels=16, num_groups=4)


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> ConsistencyModel:
    torch.manual_seed(0)
    return randomize(ConsistencyModel.from_config(tiny_config)).eval()


def require_tool(name: str, path: str | None) -> None:
    """Skip when a system tool is missing on a laptop; fail under CI, where .ci/install-tools put it."""
    if path:
        return
    message = f"{name} is not installed (CI installs it with .ci/install-tools)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)
