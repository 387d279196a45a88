"""The engine owns the device: one network evaluation f(x, σ) of a batch, with one σ and label per image.

Options: device, dtype, channels_last, torch.compile in one of its modes with a fixed set of batch-size
buckets (a batch is padded up to the next bucket, so each bucket compiles once), a TorchScript trace
(below), warm-up of every bucket, and out-of-memory recovery: when the device runs out of memory the batch
is halved and retried; only an image that fails even alone is reported failed. Inputs are float32 tensors on the
CPU or the device; outputs stay on the device, so that an image's estimate between steps never makes a round trip
through the host.

On a GPU the engine is asynchronous: `evaluate` returns once the work is queued on the device, `stage` copies a
host tensor in through pinned memory on a second stream (the copy of batch k+1's noise overlaps batch k's
kernels), `to_host` copies a result out into pinned memory without waiting, and `fence` returns what waits for
everything queued so far. On the CPU those are plain calls and `fence` waits for nothing.

On the CPU with several threads the service by default (CM_CPU_PARALLEL) cuts each batch into near-equal
slices of at most SLICE_IMAGES images, as many as a whole number of rounds of one per thread (60 images on
two threads: four slices, not three of which one thread would take two alone), and `cpu_slices` threads
each take the next slice as they become free and evaluate it with one torch thread. torch's intra-op
parallelism instead splits every one of the network's operators across its OpenMP team, whose threads meet
at a barrier after each: whenever the event loop or the client takes one of the cores, the whole team waits
for the thread that lost it. Slices never wait for each other until the end of the evaluation, and a thread
that shares its core takes fewer of them (measured under HTTP load: BENCHMARKS.md).

Batch-invariant on the CPU (`batch_invariant`, CM_BATCH_INVARIANT, on by default): every convolution and linear
layer computes each image with a product of the same shape whatever the batch (models/layers.py), so an image's
pixels do not depend on what else is in its batch or slice. oneDNN, the default otherwise, picks its kernels by
batch size, and a pixel on a rounding edge then moves by one level.

Why trace: eager PyTorch takes Python's GIL back between every one of the network's ~480 operators, so
while the event loop runs Python (parsing, answering) each operator waits for it (BENCHMARKS.md). A trace
runs the whole graph in C++ without the GIL. It is the same operators in the same order (no graph
optimisation), and it is checked bit for bit against eager at load; on any difference the engine stays eager.

Why CUDA graphs (compile mode reduce-overhead or max-autotune): a small batch on a GPU is bound by the launches
of the network's kernels, not by their work; a graph replays all of them with one launch. torch keeps the
recorded graphs per thread (torch._inductor.cudagraph_trees), and the service warms up on its loader thread but
evaluates on the scheduler's, so in those modes every call of the network runs on one thread of the engine's own:
the graphs recorded at warm-up are the ones replayed.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import pairwise

import torch

from models.consistency import ConsistencyModel
from models.layers import set_per_image

logger = logging.getLogger("cmserve.engine")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU slices hold at most this many images: every slice pays the interpreter's fixed cost per operator, so fewer,
# larger slices serve faster, while a 64-image batch still makes four that a thread sharing its core can hand over.
SLICE_IMAGES = 24
PAD_SIGMA = 1.0  # σ of padding rows: any valid level works, padding rows never touch the real ones
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs (see above)
GRAPH_WARMUP_RUNS = 3  # a graph's first call runs it plain, the second records it, the third replays it


def _nothing() -> None:
    """The fence of a synchronous device: its work is done when `evaluate` returns."""


def resolve_device(name: str, setting: str = "CM_DEVICE") -> torch.device:
    """CM_DEVICE (or an item of `setting`) -> a torch device; 'auto' picks the first CUDA device when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{setting}={name!r} but this machine has no CUDA device; use cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{setting}={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def device_labels(names: Sequence[str]) -> list[str]:
    """The metrics' device label of each of CM_DEVICES (or CM_DEVICE): `cpu`, `cuda:N`; a device listed more
    than once (cpu,cpu: two CPU engines) is told apart by its position, `cpu:0`, `cpu:1`."""
    plain = ["cuda:0" if name == "cuda" else name for name in names]
    if "auto" in plain:
        plain = [("cuda:0" if torch.cuda.is_available() else "cpu") if name == "auto" else name for name in plain]
    return [f"{name}:{i}" if plain.count(name) > 1 else name for i, name in enumerate(plain)]


@dataclass
class Evaluation:
    """The result of one evaluation: f(x, σ) clamped to [-1, 1], and the rows that could not be computed."""

    out: torch.Tensor  # (B, C, H, W) float32 on the engine's device
    failed: list[int]  # rows that ran out of device memory even in a batch of one (their `out` rows are 0)


class Engine:
    """Runs the consistency function on one device; the scheduler's thread is its only caller.

    With cpu_slices > 1 that thread runs torch with one thread from its first evaluation on.
    """

    def __init__(
        self,
        model: ConsistencyModel,
        *,
        device: torch.device | str = "cpu",
        dtype: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,  # torch.compile's mode (COMPILE_MODES); None: its default
        trace: bool = False,
        buckets: Sequence[int] = (1,),
        pad: bool | None = None,  # pad batches to the next bucket; default: only when compiling
        cpu_slices: int = 1,  # CPU: evaluate a batch in slices on this many threads (see above)
        cpu_threads: int = 0,  # CPU without slices: torch threads of the evaluating thread (0: as the process)
        batch_invariant: bool = True,  # CPU: each image by the same kernels whatever its batch (see above)
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)} or None, got {compile_mode!r}")
        if compile_mode not in (None, "default") and not compile:
            raise ValueError(f"compile_mode={compile_mode!r} needs compile=True")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # its index, so tensors' devices compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = DTYPES[dtype]
        if self.device.type == "cuda" and dtype == "fp32":
            # Same seed, same image in any batch: with cuDNN's default TF32 convolutions some uint8 values
            # differed between batch compositions on an H200; with TF32 off, none did.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.channels_last = channels_last
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.batch_invariant = batch_invariant and self.device.type == "cpu"
        set_per_image(self.model, self.batch_invariant)  # before the trace, which records the layers' kernels
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.cfg = model.cfg
        self.buckets = sorted(set(buckets))
        self.pad = compile if pad is None else pad
        self.compiled = compile
        self.compile_mode = (compile_mode or "default") if compile else None
        self.traced = False
        self._net = torch.compile(self.model, dynamic=False, mode=compile_mode) if compile else self.model
        # Graph modes: the thread every network call runs on (CUDA graphs are kept per thread; see above).
        self._graph_thread = (ThreadPoolExecutor(1, thread_name_prefix="cmserve-graphs")
                              if self.compile_mode in GRAPH_MODES else None)
        if trace and not compile:
            self._net, self.traced = self._trace()
        self.oom_splits = 0  # how many times a batch was halved after running out of memory
        # Slices on the CPU only, and not compiled (a compiled graph is not called from several threads).
        self.cpu_slices = cpu_slices if self.device.type == "cpu" and not compile else 1
        self.cpu_threads = cpu_threads if self.device.type == "cpu" else 0
        self._slicers: ThreadPoolExecutor | None = None  # the threads of the slices after the first
        # GPU: copies in run on their own stream, so that they overlap the kernels of the batch before.
        self._copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _trace(self) -> tuple[torch.nn.Module, bool]:
        """(the network as a TorchScript trace, True), or (the eager network, False) when the trace cannot be
        made or differs from eager in any bit on a check batch of another size than the example's."""
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks frozen: checked below
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated: eager if it goes
                traced = torch.jit.trace(self.model, self._example(2, 0), check_trace=False)
                for seed in (1, 2):
                    inputs = self._example(3, seed)
                    with torch.jit.optimized_execution(False):
                        same = torch.equal(traced(*inputs), self.model(*inputs))
                    if not same:
                        logger.warning("the traced network differs from eager PyTorch; running eager")
                        return self.model, False
        except Exception as e:  # an architecture the tracer cannot follow: eager still works
            logger.warning("could not trace the network (%s: %s); running eager", type(e).__name__, e)
            return self.model, False
        return traced, True

    def _example(self, size: int, seed: int) -> tuple[torch.Tensor, ...]:
        """Random network inputs on the device: x, σ across the model's range, and labels if conditional."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(size, *self.image_shape, generator=generator) * self.sigma_max
        log_sigma = torch.empty(size).uniform_(math.log(self.sigma_min), math.log(self.sigma_max), generator=generator)
        inputs = [x.to(self.device, self.dtype), log_sigma.exp().to(self.device)]
        if self.channels_last:
            inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
        if self.num_classes:
            inputs.append(torch.randint(0, self.num_classes, (size,), generator=generator).to(self.device))
        return tuple(inputs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.cfg.image_shape

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def sigma_min(self) -> float:
        return self.cfg.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.cfg.sigma_max

    @property
    def asynchronous(self) -> bool:
        """True when `evaluate` returns before the device has finished (a GPU): see `fence`."""
        return self._copies is not None

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor on the device: itself when it is there; from the host on a GPU, copied from pinned memory on the
        copy stream, which the compute stream then waits for (the call returns at once); from another device (an
        estimate another engine of CM_DEVICES made), copied after that device's work on it."""
        if t.device == self.device:
            return t
        if self._copies is None or t.device.type != "cpu":
            return t.to(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copies):
            staged = t.pin_memory().to(self.device, non_blocking=True)
        compute.wait_stream(self._copies)
        staged.record_stream(compute)  # its memory is reused only after the compute stream is done with it
        return staged

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A device tensor's copy in host memory, valid once `fence`'s wait returns (a GPU copies into pinned
        memory without waiting)."""
        if self._copies is None:
            return t.cpu()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def fence(self) -> Callable[[], None]:
        """What waits until the device has done everything queued on it so far (its thread sleeps meanwhile)."""
        if self._copies is None:
            return _nothing
        event = torch.cuda.Event(blocking=True)  # blocking: the waiting thread sleeps rather than spins
        event.record(torch.cuda.current_stream(self.device))
        return event.synchronize

    def bucket(self, size: int) -> int:
        """The batch size a batch of `size` images runs at: the next bucket up when padding, else itself."""
        if not self.pad:
            return size
        return next((b for b in self.buckets if b >= size), size)

    def warmup(self) -> None:
        """Run every bucket once (compiling it when torch.compile is on; in a graph mode until its CUDA graph is
        recorded and replayed), so no request pays for it."""
        runs = GRAPH_WARMUP_RUNS if self._graph_thread else 1
        for size in self.buckets:
            x = torch.zeros(size, *self.image_shape)
            sigma = torch.full((size,), self.sigma_max)
            labels = torch.zeros(size, dtype=torch.long) if self.num_classes else None
            for _ in range(runs):
                self.evaluate(x, sigma, labels)
        self.synchronize()

    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Evaluation:
        """f(x, σ) clamped to [-1, 1] on the device for a batch (B, C, H, W) with σ (B,) and labels (B,) or None,
        on the CPU or the device."""
        failed: list[int] = []
        out = self._evaluate_or_split(x, sigma, labels, failed, offset=0)
        return Evaluation(out=out, failed=failed)

    def _evaluate_or_split(
        self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, failed: list[int], offset: int
    ) -> torch.Tensor:
        try:
            return self._evaluate_padded(x, sigma, labels)
        except torch.OutOfMemoryError:
            pass  # recover outside the except block: the exception's traceback keeps the batch's tensors alive
        self.release_memory()
        size = x.shape[0]
        if size == 1:
            logger.error("out of device memory for a batch of one image; failing it")
            failed.append(offset)
            return torch.zeros(x.shape, device=self.device)
        self.oom_splits += 1
        half = (size + 1) // 2
        logger.warning("out of device memory for a batch of %d images; retrying as %d + %d", size, half, size - half)
        first = self._evaluate_or_split(x[:half], sigma[:half], _rows(labels, 0, half), failed, offset)
        rest = self._evaluate_or_split(x[half:], sigma[half:], _rows(labels, half, size), failed, offset + half)
        return torch.cat([first, rest])

    def _evaluate_padded(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.cpu_slices == 1:
            if self.cpu_threads and torch.get_num_threads() != self.cpu_threads:  # its share of the CPU
                torch.set_num_threads(self.cpu_threads)
            return self._evaluate_batch(x, sigma, labels)
        if torch.get_num_threads() != 1:  # the caller (the engine thread) evaluates its slice with one thread
            torch.set_num_threads(1)
        size = x.shape[0]
        rounds = math.ceil(size / SLICE_IMAGES / self.cpu_slices)  # a slice each per round: no thread idles
        count = min(size, rounds * self.cpu_slices)
        if count == 1:
            return self._evaluate_batch(x, sigma, labels)
        if self._slicers is None:
            self._slicers = ThreadPoolExecutor(self.cpu_slices - 1, thread_name_prefix="cmserve-slice",
                                               initializer=torch.set_num_threads, initargs=(1,))
        bounds = [size * i // count for i in range(count + 1)]  # near-equal slices, in order
        parts = [(x[a:b], sigma[a:b], _rows(labels, a, b)) for a, b in pairwise(bounds)]
        outs: list[torch.Tensor | None] = [None] * count
        indices = iter(range(count))  # shared: each thread takes the next slice when it is free

        def take_slices() -> None:
            for i in indices:
                outs[i] = self._evaluate_batch(*parts[i])

        helpers = [self._slicers.submit(take_slices) for _ in range(min(self.cpu_slices, count) - 1)]
        try:
            take_slices()
        finally:
            wait(helpers)  # none still runs when this returns or raises
        for helper in helpers:
            helper.result()  # a helper's error
        return torch.cat(outs)  # type: ignore[arg-type]

    def _evaluate_batch(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        size = x.shape[0]
        padded = self.bucket(size)
        if padded > size:  # padding rows: zeros at a valid σ; every op of the network is per image
            extra = padded - size
            x = torch.cat([x, x.new_zeros(extra, *x.shape[1:])])
            sigma = torch.cat([sigma, sigma.new_full((extra,), PAD_SIGMA)])
            labels = None if labels is None else torch.cat([labels, labels.new_zeros(extra)])
        x = x.to(device=self.device, dtype=self.dtype, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sigma = sigma.to(device=self.device, dtype=torch.float32, non_blocking=True)
        if labels is not None:
            labels = labels.to(device=self.device, non_blocking=True)
        if self._graph_thread is not None:  # the thread whose CUDA graphs were recorded at warm-up
            return self._graph_thread.submit(self._run, x, sigma, labels, size).result()
        return self._run(x, sigma, labels, size)

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, size: int) -> torch.Tensor:
        """The network on a padded device batch, its first `size` rows clamped, as float32 (a tensor of its own:
        a CUDA graph's output memory is overwritten by its next replay)."""
        with torch.inference_mode():
            if self._graph_thread is not None:  # the last call's outputs were clamped into tensors of their own
                torch.compiler.cudagraph_mark_step_begin()
            out = self._forward(x, sigma, labels)[:size].clamp(-1, 1)  # (B, C, H, W), CM Algorithm 1 clamp
            return out.to(dtype=torch.float32, memory_format=torch.contiguous_format)

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """One call of the network on the device (the seam where tests inject failures)."""
        if self.traced:  # the trace takes labels only when the model is conditional; no graph optimisation
            try:
                with torch.jit.optimized_execution(False):
                    return self._net(x, sigma) if labels is None else self._net(x, sigma, labels)
            except RuntimeError as e:
                # The TorchScript interpreter re-raises a device's out-of-memory error as a plain RuntimeError
                # (pytorch/pytorch#148642); give it back its type so that the batch is halved as in eager mode.
                if isinstance(e, torch.OutOfMemoryError) or "out of memory" not in str(e):
                    raise
                raise torch.OutOfMemoryError(str(e)) from None
        return self._net(x, sigma, labels)

    def release_memory(self) -> None:
        """Give cached device memory back after an out-of-memory error."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_bytes(self) -> tuple[int, int] | None:
        """(allocated, reserved) device memory in bytes; None on the CPU."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)


def _rows(labels: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if labels is None else labels[start:stop]
