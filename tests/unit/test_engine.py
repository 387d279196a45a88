"""The engine: one evaluation per batch, padding to buckets, out-of-memory halving, warm-up, options."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
import torch

from models.consistency import ConsistencyModel
from models.sampling import to_uint8
from service.engine import Engine, resolve_device


def batch(size: int, seed: int = 0, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 1, 8, 8, generator=gen) * 2
    sigma = torch.exp(torch.randn(size, generator=gen))  # one σ per image
    labels = torch.randint(num_classes, (size,), generator=gen)
    return x, sigma, labels


class JunkPadding(Engine):
    """Fills the padding rows with huge values before the network runs: the real rows must not notice."""

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = x.clone()
        x[self.real_rows :] = 1e4 * torch.randn_like(x[self.real_rows :])
        return super()._forward(x, sigma, labels)


class OOMAbove(Engine):
    """Raises the CUDA out-of-memory error for batches larger than `limit` (the injected failure)."""

    def __init__(self, *args: object, limit: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.limit = limit
        self.sizes: list[int] = []
        self.released_outside_except: list[bool] = []

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return super()._forward(x, sigma, labels)

    def release_memory(self) -> None:
        self.released_outside_except.append(sys.exc_info()[0] is None)
        super().release_memory()


def test_evaluate_is_the_clamped_consistency_function(tiny_model: ConsistencyModel) -> None:
    engine = Engine(tiny_model, buckets=[1, 4])
    x, sigma, labels = batch(3)
    out = engine.evaluate(x, sigma, labels)
    with torch.no_grad():
        expected = tiny_model(x, sigma, labels).clamp(-1, 1)
    assert out.failed == []
    assert out.out.dtype == torch.float32 and out.out.device.type == "cpu"
    torch.testing.assert_close(out.out, expected, rtol=0, atol=1e-6)


def test_bucket_rounds_up_only_when_padding(tiny_model: ConsistencyModel) -> None:
    padded = Engine(tiny_model, buckets=[1, 4, 8], pad=True)
    assert [padded.bucket(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 4, 4, 4, 8, 8]
    assert Engine(tiny_model, buckets=[1, 4, 8]).bucket(3) == 3  # eager: no padding by default


def test_padding_rows_never_change_the_real_rows(tiny_model: ConsistencyModel) -> None:
    x, sigma, labels = batch(5)
    zero_padded = Engine(tiny_model, buckets=[8], pad=True).evaluate(x, sigma, labels).out
    junk = JunkPadding(tiny_model, buckets=[8], pad=True)
    junk.real_rows = 5
    junk_padded = junk.evaluate(x, sigma, labels).out
    assert torch.equal(zero_padded, junk_padded)  # same batch size, different padding: bit for bit
    unpadded = Engine(tiny_model, buckets=[8], pad=False).evaluate(x, sigma, labels).out
    np.testing.assert_array_equal(to_uint8(unpadded), to_uint8(zero_padded))


def test_out_of_memory_halves_the_batch_until_it_fits(tiny_model: ConsistencyModel) -> None:
    x, sigma, labels = batch(7)
    whole = Engine(tiny_model).evaluate(x, sigma, labels).out
    engine = OOMAbove(tiny_model, limit=2)
    result = engine.evaluate(x, sigma, labels)
    assert result.failed == []
    assert engine.oom_splits == 3  # 7 -> 4 + 3 -> (2 + 2) + (2 + 1)
    assert [s for s in engine.sizes if s <= 2] == [2, 2, 2, 1]
    assert all(engine.released_outside_except)  # the cache is emptied after leaving the except block
    np.testing.assert_array_equal(to_uint8(result.out), to_uint8(whole))
    torch.testing.assert_close(result.out, whole, rtol=0, atol=1e-6)


def test_out_of_memory_for_one_image_fails_that_row_only(tiny_model: ConsistencyModel) -> None:
    class OOMOnLabelNine(Engine):
        def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            if labels is not None and bool((labels == 9).any()):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return super()._forward(x, sigma, labels)

    x, sigma, _ = batch(4)
    labels = torch.tensor([1, 9, 2, 3])
    result = OOMOnLabelNine(tiny_model).evaluate(x, sigma, labels)
    assert result.failed == [1]
    keep = [0, 2, 3]
    expected = Engine(tiny_model).evaluate(x[keep], sigma[keep], labels[keep]).out
    np.testing.assert_array_equal(to_uint8(result.out[keep]), to_uint8(expected))


def test_warmup_runs_every_bucket_once(tiny_model: ConsistencyModel) -> None:
    engine = OOMAbove(tiny_model, limit=10**6, buckets=[4, 1, 2, 8], pad=True)
    engine.warmup()
    assert engine.sizes == [1, 2, 4, 8]


def test_unconditional_model_takes_no_labels(tiny_config) -> None:
    model = ConsistencyModel.from_config(tiny_config.replace(num_classes=0)).eval()
    engine = Engine(model, buckets=[1, 2])
    engine.warmup()
    x, sigma, _ = batch(2)
    assert engine.evaluate(x, sigma, None).out.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_runs_and_returns_float32(tiny_model: ConsistencyModel, dtype: str) -> None:
    x, sigma, labels = batch(4)
    out = Engine(tiny_model, dtype=dtype).evaluate(x, sigma, labels).out
    reference = Engine(tiny_model).evaluate(x, sigma, labels).out
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert float((out - reference).abs().max()) < 0.1


def test_channels_last_gives_the_same_images(tiny_model: ConsistencyModel) -> None:
    x, sigma, labels = batch(6)
    nhwc = Engine(tiny_model, channels_last=True).evaluate(x, sigma, labels).out
    nchw = Engine(tiny_model).evaluate(x, sigma, labels).out
    assert nhwc.is_contiguous()
    np.testing.assert_array_equal(to_uint8(nhwc), to_uint8(nchw))


def test_engine_refuses_an_unknown_dtype(tiny_model: ConsistencyModel) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        Engine(tiny_model, dtype="fp8")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"CM_DEVICE='cuda:1' but this machine has no CUDA device"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("num_classes", [10, 0])
def test_traced_network_is_bit_for_bit_eager_at_every_batch_size(tiny_config, num_classes: int) -> None:
    model = ConsistencyModel.from_config(tiny_config.replace(num_classes=num_classes)).eval()
    traced, eager = Engine(model, trace=True), Engine(model)
    assert traced.traced and not eager.traced
    for size in (1, 5, 8):  # the trace was made at 2 and checked at 3
        x, sigma, labels = batch(size, seed=size)
        labels = labels if num_classes else None
        assert torch.equal(traced.evaluate(x, sigma, labels).out, eager.evaluate(x, sigma, labels).out)


def test_trace_runs_without_the_gil(tiny_model: ConsistencyModel) -> None:
    """Beside a thread that runs Python nonstop, eager evaluation waits for the GIL at every operator (5 ms
    switch interval each); the trace takes it only to start and to return. Ratio of wall times, one run."""
    x, sigma, labels = batch(16)
    seconds = {}
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    engines = {"traced": Engine(tiny_model, trace=True), "eager": Engine(tiny_model)}
    for engine in engines.values():
        engine.evaluate(x, sigma, labels)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        for name, engine in engines.items():
            start = time.perf_counter()
            for _ in range(3):
                engine.evaluate(x, sigma, labels)
            seconds[name] = time.perf_counter() - start
    finally:
        stop.set()
        spinner.join()
    assert seconds["eager"] > 3 * seconds["traced"], seconds


def test_a_trace_that_fails_or_differs_falls_back_to_eager(
    tiny_model: ConsistencyModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_trace = torch.jit.trace

    def off_by_a_bit(module, inputs, **kwargs):  # a trace whose results differ from eager in the last bit
        traced = real_trace(module, inputs, **kwargs)
        return lambda *args: torch.nextafter(traced(*args), torch.tensor(float("inf")))

    monkeypatch.setattr(torch.jit, "trace", off_by_a_bit)
    engine = Engine(tiny_model, trace=True)
    assert not engine.traced and "differs from eager" in caplog.text

    def untraceable(module, inputs, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.jit, "trace", untraceable)
    engine = Engine(tiny_model, trace=True)
    assert not engine.traced and "could not trace the network (RuntimeError: unsupported operator)" in caplog.text
    x, sigma, labels = batch(3)
    assert torch.equal(engine.evaluate(x, sigma, labels).out, Engine(tiny_model).evaluate(x, sigma, labels).out)


def test_out_of_memory_inside_the_trace_still_halves_the_batch(tiny_model: ConsistencyModel) -> None:
    """TorchScript re-raises CUDA's out-of-memory error as a RuntimeError that only says so in its text
    (pytorch/pytorch#148642); the engine must still split the batch."""
    engine = Engine(tiny_model, trace=True)
    traced, sizes = engine._net, []

    def interpreter(*args: torch.Tensor) -> torch.Tensor:  # the trace, failing as the interpreter reports it
        if args[0].shape[0] > 2:
            raise RuntimeError("The following operation failed in the TorchScript interpreter.\n"
                               "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
        sizes.append(args[0].shape[0])
        return traced(*args)

    engine._net = interpreter
    x, sigma, labels = batch(5)
    result = engine.evaluate(x, sigma, labels)
    assert sizes == [2, 1, 2] and result.failed == [] and engine.oom_splits == 2  # 5 -> (2 + 1) + 2
    torch.testing.assert_close(result.out, Engine(tiny_model).evaluate(x, sigma, labels).out, rtol=0, atol=1e-6)
    engine._net = lambda *args: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is not a memory problem
        engine.evaluate(x, sigma, labels)


def test_compile_takes_precedence_over_trace(tiny_model: ConsistencyModel) -> None:
    engine = Engine(tiny_model, compile=True, trace=True)
    assert engine.compiled and not engine.traced


@pytest.mark.slow
def test_compiled_buckets_match_eager(tiny_model: ConsistencyModel) -> None:
    compiled = Engine(tiny_model, compile=True, buckets=[1, 4])
    compiled.warmup()
    x, sigma, labels = batch(3)
    eager = Engine(tiny_model).evaluate(x, sigma, labels).out
    np.testing.assert_array_equal(to_uint8(compiled.evaluate(x, sigma, labels).out), to_uint8(eager))
