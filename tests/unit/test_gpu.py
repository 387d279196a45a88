"""The same checks on a CUDA device (run by bench/gpu_check.sh with -m gpu; skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load, save
from models.config import preset
from models.consistency import ConsistencyModel
from models.sampling import sample, to_uint8
from tests.conftest import randomize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def cuda_model(tmp_path: Path) -> ConsistencyModel:
    model = randomize(ConsistencyModel.from_config(preset("digits")))
    path = save(tmp_path / "m.safetensors", model, preset="digits")
    return load(path, device="cuda").model


def test_boundary_condition_exact_on_cuda(cuda_model: ConsistencyModel) -> None:
    x = torch.randn(8, 1, 8, 8, device="cuda")
    labels = torch.arange(8, device="cuda")
    assert torch.equal(cuda_model(x, 0.002, labels), x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(cuda_model(x, 0.002, labels), x)


@pytest.mark.parametrize("sigmas", [[80.0], [80.0, 0.821]])
def test_seeded_sampling_batch_invariant_on_cuda(cuda_model: ConsistencyModel, sigmas: list[float]) -> None:
    alone = to_uint8(sample(cuda_model, [1234], sigmas))
    batch = to_uint8(sample(cuda_model, [7, 99, 1234, *range(500, 513)], sigmas))
    np.testing.assert_array_equal(alone[0], batch[2])


def test_cuda_matches_cpu(cuda_model: ConsistencyModel, tmp_path: Path) -> None:
    cpu_model = cuda_model.to("cpu")
    cpu = sample(cpu_model, list(range(8)), [80.0, 0.821])
    gpu = sample(cuda_model.to("cuda"), list(range(8)), [80.0, 0.821]).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)
