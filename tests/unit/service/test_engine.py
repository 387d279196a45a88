"""The engine: one evaluation per batch, padding to buckets, out-of-memory halving, warm-up, options."""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from models.consistency import ConsistencyModel
from models.sampling import to_uint8
from service.engine import Engine, resolve_device
from service.registry import load_model, model_specs
from service.settings import Settings


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
    switch interval each); the trace takes it only to start and to return. Ratio of wall times in one round; up
    to five rounds, since on busy cores the spinning thread is itself descheduled and stops contending."""
    x, sigma, labels = batch(16)
    engines = {"traced": Engine(tiny_model, trace=True), "eager": Engine(tiny_model)}
    for engine in engines.values():
        engine.evaluate(x, sigma, labels)
    rounds = []
    for _ in range(5):
        seconds = beside_a_spinning_thread(engines, x, sigma, labels)
        rounds.append(seconds)
        if seconds["eager"] > 3 * seconds["traced"]:
            return
    if os.getloadavg()[0] >= (os.cpu_count() or 1):
        pytest.skip(f"every core is busy (load {os.getloadavg()[0]:.1f}): the spinning thread seldom runs, so the GIL "
                    f"is not contended; rounds {rounds}")
    raise AssertionError(f"eager was never 3× the trace's wall time beside a spinning thread: {rounds}")


def beside_a_spinning_thread(engines: dict[str, Engine], x: torch.Tensor, sigma: torch.Tensor,
                             labels: torch.Tensor | None) -> dict[str, float]:
    """Each engine's wall time for 3 evaluations while another thread runs Python nonstop."""
    seconds = {}
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

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
    return seconds


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


def test_compile_mode_is_one_of_torch_compiles_and_needs_compile(tiny_model: ConsistencyModel) -> None:
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        Engine(tiny_model, compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="needs compile=True"):
        Engine(tiny_model, compile_mode="reduce-overhead")
    assert Engine(tiny_model, compile_mode="default").compile_mode is None  # torch's default: nothing to compile


class CompileSpy:
    """Stands in for torch.compile: records its keyword arguments and, per call of the network, the thread and
    whether inference mode was on."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}
        self.calls: list[tuple[int, int, bool]] = []  # (batch size, thread id, inference mode)

    def __call__(self, model: torch.nn.Module, **kwargs: Any) -> Callable[..., torch.Tensor]:
        self.kwargs = kwargs

        def net(*args: torch.Tensor) -> torch.Tensor:
            self.calls.append((args[0].shape[0], threading.get_ident(), torch.is_inference_mode_enabled()))
            return model(*args)

        return net


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs", None])
def test_compile_mode_is_passed_to_torch_compile(
    tiny_model: ConsistencyModel, monkeypatch: pytest.MonkeyPatch, mode: str | None
) -> None:
    spy = CompileSpy()
    monkeypatch.setattr(torch, "compile", spy)
    engine = Engine(tiny_model, compile=True, compile_mode=mode, buckets=[1, 4])
    assert spy.kwargs == {"dynamic": False, "mode": mode}
    assert engine.compiled and engine.compile_mode == (mode or "default")


def test_graph_modes_call_the_network_on_one_thread_of_the_engine(
    tiny_model: ConsistencyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA graphs are kept per thread: those recorded during warm-up (the loader's thread) must be the ones the
    scheduler's thread replays, so every call runs on the engine's own thread, in inference mode."""
    spy = CompileSpy()
    monkeypatch.setattr(torch, "compile", spy)
    engine = Engine(tiny_model, compile=True, compile_mode="reduce-overhead", buckets=[1, 4])
    engine.warmup()
    assert [size for size, _, _ in spy.calls] == [1, 1, 1, 4, 4, 4]  # each bucket until its graph replays
    x, sigma, labels = batch(3)
    out = on_own_thread(lambda: engine.evaluate(x, sigma, labels)).out  # as the scheduler's thread calls it
    threads = {thread for _, thread, _ in spy.calls}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert all(inference for _, _, inference in spy.calls)
    torch.testing.assert_close(out, Engine(tiny_model).evaluate(x, sigma, labels).out, rtol=0, atol=1e-6)


def test_out_of_memory_on_the_graph_thread_still_halves_the_batch(
    tiny_model: ConsistencyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "compile", CompileSpy())
    engine = OOMAbove(tiny_model, compile=True, compile_mode="reduce-overhead", buckets=[1, 2, 4], limit=2)
    x, sigma, labels = batch(4)
    result = engine.evaluate(x, sigma, labels)
    assert engine.sizes == [4, 2, 2] and result.failed == [] and engine.oom_splits == 1


@pytest.mark.slow
def test_reduce_overhead_on_the_cpu_matches_eager(tiny_model: ConsistencyModel) -> None:
    compiled = Engine(tiny_model, compile=True, compile_mode="reduce-overhead", buckets=[1, 4])
    compiled.warmup()
    x, sigma, labels = batch(3)
    eager = Engine(tiny_model).evaluate(x, sigma, labels).out
    out = on_own_thread(lambda: compiled.evaluate(x, sigma, labels)).out
    np.testing.assert_array_equal(to_uint8(out), to_uint8(eager))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_warmed_up_on_one_thread_serve_another(tiny_model: ConsistencyModel) -> None:
    """reduce-overhead on CUDA: warm-up here, evaluations from another thread (as the service does), close to
    eager on the same device."""
    compiled = Engine(tiny_model, device="cuda", compile=True, compile_mode="reduce-overhead", buckets=[1, 4])
    compiled.warmup()
    eager = Engine(copy.deepcopy(tiny_model), device="cuda")
    for seed, size in ((0, 3), (1, 1), (2, 4)):
        x, sigma, labels = batch(size, seed)
        out = on_own_thread(lambda: compiled.evaluate(x, sigma, labels)).out  # noqa: B023 (called at once)
        torch.testing.assert_close(out, eager.evaluate(x, sigma, labels).out, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------- CPU slices

def on_own_thread(fn: Callable[[], Any]) -> Any:
    """Call fn on a fresh thread, as the scheduler's engine thread calls the engine (a sliced evaluation leaves
    its caller with one torch thread; the test process keeps its own)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=120)


def one_thread_evaluation(engine: Engine, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    def run() -> torch.Tensor:
        torch.set_num_threads(1)
        return engine.evaluate(x, sigma, labels).out

    return on_own_thread(run)


class Rendezvous(Engine):
    """Each network call waits until `parties` calls are in at once, and records its thread and torch threads."""

    def __init__(self, *args: Any, parties: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.barrier = threading.Barrier(parties, timeout=60)
        self.calls: list[tuple[int, int, int]] = []  # (size, thread id, torch threads)

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((x.shape[0], threading.get_ident(), torch.get_num_threads()))
        self.barrier.wait()  # BrokenBarrierError unless the other slice runs at the same time
        return super()._forward(x, sigma, labels)


def test_cpu_slices_run_at_once_on_one_torch_thread_each_and_match_each_slice_alone(
    tiny_model: ConsistencyModel,
) -> None:
    x, sigma, labels = batch(7)
    engine = Rendezvous(tiny_model, trace=True, cpu_slices=2, parties=2)
    out = on_own_thread(lambda: engine.evaluate(x, sigma, labels).out)
    assert sorted(size for size, _, _ in engine.calls) == [3, 4]  # near-equal slices of 7
    assert len({thread for _, thread, _ in engine.calls}) == 2
    assert [threads for _, _, threads in engine.calls] == [1, 1]
    alone = Engine(tiny_model, trace=True)
    expected = torch.cat([one_thread_evaluation(alone, x[:3], sigma[:3], labels[:3]),
                          one_thread_evaluation(alone, x[3:], sigma[3:], labels[3:])])
    assert torch.equal(out, expected)  # in order, bit for bit


def test_a_large_batch_is_cut_into_slices_that_two_threads_share(tiny_model: ConsistencyModel) -> None:
    x, sigma, labels = batch(60)
    engine = Rendezvous(tiny_model, trace=True, cpu_slices=2, parties=1)
    out = on_own_thread(lambda: engine.evaluate(x, sigma, labels).out)
    # at most SLICE_IMAGES = 24 each, and a whole number of rounds of one slice per thread: four, not three
    assert sorted(size for size, _, _ in engine.calls) == [15, 15, 15, 15]
    expected = one_thread_evaluation(Engine(tiny_model, trace=True), x, sigma, labels)
    assert torch.equal(out, expected)  # per-image kernels: a slice computes its images as the whole batch does


@pytest.mark.parametrize(("slices", "threads"), [(2, 0), (1, 2)], ids=["slices", "operators"])
def test_an_image_has_the_same_bits_alone_and_in_any_batch_on_the_cpu(
    tiny_model: ConsistencyModel, slices: int, threads: int
) -> None:
    x, sigma, labels = batch(24, seed=3)
    engine = Engine(tiny_model, trace=True, cpu_slices=slices, cpu_threads=threads)
    assert engine.batch_invariant

    def rows(a: int, b: int) -> torch.Tensor:
        return on_own_thread(lambda: engine.evaluate(x[a:b], sigma[a:b], labels[a:b]).out)

    alone = torch.cat([rows(i, i + 1) for i in range(24)])
    for size in (2, 3, 7, 16, 24):
        assert torch.equal(rows(0, size), alone[:size]), size


def test_a_batch_of_one_is_not_sliced(tiny_model: ConsistencyModel) -> None:
    x, sigma, labels = batch(1)
    engine = Rendezvous(tiny_model, cpu_slices=2, parties=1)
    caller = on_own_thread(lambda: (engine.evaluate(x, sigma, labels), threading.get_ident())[1])
    assert engine.calls == [(1, caller, 1)]


def test_out_of_memory_in_slices_still_halves_the_batch(tiny_model: ConsistencyModel) -> None:
    x, sigma, labels = batch(8)
    engine = OOMAbove(tiny_model, limit=2, cpu_slices=2)
    result = on_own_thread(lambda: engine.evaluate(x, sigma, labels))
    assert result.failed == [] and engine.oom_splits == 1  # 8 = 4 + 4 slices fail; 4 + 4 as slices of 2 fit
    assert sorted(s for s in engine.sizes if s <= 2) == [2, 2, 2, 2]
    expected = one_thread_evaluation(Engine(tiny_model), x, sigma, labels)
    np.testing.assert_array_equal(to_uint8(result.out), to_uint8(expected))


def test_a_failing_slice_fails_the_evaluation_and_the_engine_goes_on(tiny_model: ConsistencyModel) -> None:
    class FailsOnLabelNine(Engine):
        def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            if labels is not None and bool((labels == 9).any()):
                raise RuntimeError("injected failure")
            return super()._forward(x, sigma, labels)

    x, sigma, _ = batch(4)
    engine = FailsOnLabelNine(tiny_model, cpu_slices=2)
    with pytest.raises(RuntimeError, match="injected failure"):  # the failing slice is the second, on a helper
        on_own_thread(lambda: engine.evaluate(x, sigma, torch.tensor([1, 2, 3, 9])))
    assert on_own_thread(lambda: engine.evaluate(x, sigma, torch.tensor([1, 2, 3, 4]))).out.shape == (4, 1, 8, 8)


def test_slices_are_for_the_cpu_without_compile(tiny_model: ConsistencyModel) -> None:
    assert Engine(tiny_model, cpu_slices=2).cpu_slices == 2
    assert Engine(tiny_model, cpu_slices=2, compile=True).cpu_slices == 1


@pytest.mark.parametrize(("parallel", "slices"), [("slices", 2), ("operators", 1)])
def test_the_service_cuts_cpu_batches_into_one_slice_per_thread_by_default(parallel: str, slices: int) -> None:
    settings = Settings(cpu_parallel=parallel, torch_threads=2, batch_buckets=[1, 2], max_batch=2, device="cpu")
    served = on_own_thread(lambda: load_model(model_specs(settings)[0], settings))
    assert served.engine.cpu_slices == slices


@pytest.mark.parametrize("invariant", [True, False])
def test_batch_invariance_is_a_setting_of_the_cpu_engine(invariant: bool) -> None:
    settings = Settings(batch_invariant=invariant, batch_buckets=[1, 2], max_batch=2, device="cpu")
    served = on_own_thread(lambda: load_model(model_specs(settings)[0], settings))
    assert served.engine.batch_invariant is invariant
    layers = [m for m in served.engine.model.modules() if hasattr(m, "per_image")]
    assert layers and all(m.per_image is invariant for m in layers)
