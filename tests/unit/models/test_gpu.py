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


def _cifar_inputs(size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(size, 3, 32, 32, generator=gen) * 2
    sigma = torch.exp(torch.randn(size, generator=gen))
    labels = torch.randint(num_classes, (size,), generator=gen) if num_classes else None
    return x, sigma, labels


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_trace_on_cuda_is_taken_and_equals_eager(dtype: str) -> None:
    """The serving default (CM_TRACE) on a GPU: the trace passes its bit-for-bit check at load and serves."""
    from service.engine import Engine

    model = randomize(ConsistencyModel.from_config(preset("cifar10")), std=0.02)
    traced = Engine(model, device="cuda", dtype=dtype, channels_last=True, trace=True)
    eager = Engine(model, device="cuda", dtype=dtype, channels_last=True, trace=False)
    assert traced.traced and not eager.traced
    x, sigma, labels = _cifar_inputs(16, model.cfg.num_classes)
    torch.testing.assert_close(
        traced.evaluate(x, sigma, labels).out, eager.evaluate(x, sigma, labels).out, atol=0, rtol=0
    )


@pytest.mark.parametrize("trace", [True, False])
def test_real_out_of_memory_halves_the_batch_on_cuda(trace: bool) -> None:
    """A batch larger than a capped device memory runs out of memory for real (through the TorchScript
    interpreter too, which re-raises it as a plain RuntimeError) and is computed in halves, same results."""
    from service.engine import Engine

    model = randomize(ConsistencyModel.from_config(preset("cifar10")), std=0.02)
    engine = Engine(model, device="cuda", dtype="fp32", trace=trace)
    assert engine.traced == trace
    x, sigma, labels = _cifar_inputs(2048, model.cfg.num_classes)
    rows = [slice(i, i + 32) for i in range(0, 2048, 32)]
    reference = torch.cat([engine.evaluate(x[r], sigma[r], None if labels is None else labels[r]).out for r in rows])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine.evaluate(x[:32], sigma[:32], None if labels is None else labels[:32])
    per_32 = torch.cuda.max_memory_allocated() - base  # activations and cuDNN's workspace for 32 images
    torch.cuda.empty_cache()
    cap = base + 1.5 * per_32  # 32 images fit, 2,048 cannot (cuDNN falls back to smaller workspaces first)
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    try:
        result = engine.evaluate(x, sigma, labels)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert engine.oom_splits >= 2, f"no out-of-memory under a cap of {cap / 2**20:.0f} MiB ({per_32=})"
    assert result.failed == []
    torch.testing.assert_close(result.out, reference, atol=1e-3, rtol=1e-3)


MIXED_SPECS = [(7, 3, [80.0, 17.5, 2.5, 0.17]), (1000, 1, [80.0]), (42, 4, [80.0, 0.821]), (9, 2, [80.0])]


def _scheduled_images(engines: list, specs: list[tuple[int, int, list[float]]], max_batch: int) -> list[np.ndarray]:
    """Each job's uint8 images from a started Scheduler with one engine per device."""
    from service.scheduler import Job, Scheduler
    from tests.unit.service.test_scheduler import serve_jobs

    scheduler = Scheduler(max_batch=max_batch, max_wait_s=0.0, max_queue=1000,
                          devices=[str(engine.device) for engine in engines])
    scheduler.add_model("m", *engines)
    jobs = [Job("m", sigmas, seed, n, None, 1e12) for seed, n, sigmas in specs]
    serve_jobs(scheduler, jobs, timeout=60)
    assert all(job.error is None for job in jobs)
    return [job.images.copy() for job in jobs]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pipelined_scheduler_on_cuda_gives_each_seed_its_image_alone_or_in_batches(dtype: str) -> None:
    """The asynchronous engine (pinned staging on a copy stream, estimates on the device, a fence per batch) under
    the scheduler's threads: a request's images are the same bits alone and in mixed batches of several steps."""
    from service.engine import Engine

    engine = Engine(randomize(ConsistencyModel.from_config(preset("digits"))), device="cuda", dtype=dtype)
    assert engine.asynchronous
    together = _scheduled_images([engine], MIXED_SPECS, max_batch=5)
    for spec, mixed in zip(MIXED_SPECS, together, strict=True):
        np.testing.assert_array_equal(_scheduled_images([engine], [spec], max_batch=64)[0], mixed)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_cuda_devices_continue_each_others_images() -> None:
    """CM_DEVICES=cuda:0,cuda:1: an image's next step may run on the other device, its estimate copied there."""
    import copy

    from service.engine import Engine

    model = randomize(ConsistencyModel.from_config(preset("digits")))
    engines = [Engine(copy.deepcopy(model), device=f"cuda:{i}") for i in (0, 1)]
    together = _scheduled_images(engines, MIXED_SPECS * 4, max_batch=3)
    for spec, mixed in zip(MIXED_SPECS * 4, together, strict=True):
        np.testing.assert_array_equal(_scheduled_images(engines[:1], [spec], max_batch=64)[0], mixed)
