"""Prometheus metrics (names of docs/serving.md), on a registry of their own, plus the /v1/stats summary.

Every label value is bounded: model names come from the settings, codes and reasons from fixed sets.
Series whose labels are known in advance exist (at 0) from the start, so rate() and absent() behave.

With CM_WORKERS > 1 the parent sets PROMETHEUS_MULTIPROC_DIR and prometheus_client keeps every value in
files there, so any worker's /metrics and /v1/stats report the sum over workers: counters and histograms
add up, gauges follow their `multiprocess_mode` (queue depth and requests in progress: sum over live
workers; ready: 1 only when every live worker is). Gauges read from callbacks (queue depth, ready) are
then written by each worker every LIVE_REFRESH_S and at each of its scrapes (ready also whenever it changes);
the process_* metrics are not exported in that mode.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

from .scheduler import TASKS, SchedulerObserver

VERSION = "0.1.0"
FAILURE_REASONS = ("rejected", "timeout", "cancelled", "invalid", "oom", "error")
FORMATS = ("png", "jpeg", "webp")
UNKNOWN_MODEL = "unknown"  # the model label of requests that never named a served model
UNKNOWN_TASK = "unknown"  # the task label of edit requests whose body never said which task
REQUEST_TASKS = (*TASKS, UNKNOWN_TASK)
# Seconds, about 1 ms to 120 s; 0.1 s and 1 s are the latency objectives, 30 s the default deadline.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
FORWARD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
ENCODE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
STATS_WINDOW_S = 10.0  # /v1/stats rates are averages over about this long
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LIVE_REFRESH_S = 0.5  # with several workers, how often each writes its callback gauges


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """One model's label children of the per-model metrics."""

    forward_duration: Any
    batch_size: Any
    forward_passes: Any
    images: Any
    queue_wait: Any
    request_duration: Any
    queue_depth: Any


class Metrics(SchedulerObserver):
    """All metric objects of one server; also the scheduler's observer."""

    def __init__(self, model_names: Iterable[str], batch_buckets: Iterable[int],
                 devices: Iterable[str] = ("0",)) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        if not self.multiprocess:  # per-process figures: meaningless summed over workers
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.requests = Counter(
            "cmserve_requests", "Generate requests by final status code", ["model", "code"], registry=r
        )
        self.failures = Counter(
            "cmserve_request_failures", "Generate requests that failed, by reason", ["model", "reason"], registry=r
        )
        self.request_duration = Histogram(
            "cmserve_request_duration_seconds", "Generate request latency", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "cmserve_queue_wait_seconds", "Time from admission to a request's first evaluation", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.forward_duration = Histogram(
            "cmserve_forward_duration_seconds", "One network evaluation of a batch", ["model"],
            buckets=FORWARD_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "cmserve_batch_size", "Images per network evaluation", ["model"],
            buckets=tuple(float(b) for b in sorted(set(batch_buckets))), registry=r,
        )
        self.forward_passes = Counter("cmserve_forward_passes", "Network evaluations", ["model"], registry=r)
        # The same two histograms by device (CM_DEVICES; label values from the settings); the ones above keep
        # their label sets, which dashboards, alerts and scripts match exactly.
        self.device_forward_duration = Histogram(
            "cmserve_device_forward_duration_seconds", "One network evaluation of a batch, by device",
            ["model", "device"], buckets=FORWARD_BUCKETS, registry=r,
        )
        self.device_batch_size = Histogram(
            "cmserve_device_batch_size", "Images per network evaluation, by device", ["model", "device"],
            buckets=tuple(float(b) for b in sorted(set(batch_buckets))), registry=r,
        )
        self.images = Counter("cmserve_images_generated", "Images that took their last step", ["model"], registry=r)
        # The same two counts by task (scheduler.TASKS); cmserve_requests and cmserve_images_generated keep their
        # label sets, which dashboards, alerts and scripts match exactly.
        self.task_requests = Counter(
            "cmserve_task_requests", "Requests (generate and edit) by task, any status", ["model", "task"], registry=r
        )
        self.task_images = Counter(
            "cmserve_task_images", "Images that took their last step, by task", ["model", "task"], registry=r
        )
        self.encode_duration = Histogram(
            "cmserve_encode_duration_seconds", "Encoding one request's images", ["format"],
            buckets=ENCODE_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("cmserve_queue_depth", "Images waiting for an evaluation", ["model"], registry=r,
                                 multiprocess_mode="livesum")
        self.in_progress = Gauge("cmserve_requests_in_progress", "Generate requests being handled", registry=r,
                                 multiprocess_mode="livesum")
        self.model_info = Gauge(
            "cmserve_model_info", "Served model", ["model", "checkpoint_sha256", "preset"], registry=r,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge("cmserve_ready", "1 when models are loaded and warmed up and not draining", registry=r,
                           multiprocess_mode="livemin")
        self.build_info = Gauge("cmserve_build_info", "cmserve version", ["version"], registry=r,
                                multiprocess_mode="livemax")
        self.build_info.labels(VERSION).set(1)
        self._live: list[tuple[Gauge, Callable[[], float]]] = []  # gauges whose value a callback gives
        self._per_model: dict[str, ModelMetrics] = {}
        self._cache: dict[tuple, Any] = {}  # label children of the request-path metrics (bounded label values)
        self._memory: dict[str, Callable[[], tuple[int, int] | None]] = {}  # by device label
        self._stats_lock = threading.Lock()
        self._samples: deque[tuple[float, ...]] = deque()  # (time, requests, images, batch sum, batch count)
        for name in model_names:
            self._children(name)
            for device in devices:
                self._child(self.device_forward_duration, name, device)
                self._child(self.device_batch_size, name, device)
        for name in FORMATS:
            self.encode_duration.labels(name)
        if self.multiprocess:
            threading.Thread(target=self._refresh_forever, name="cmserve-metrics", daemon=True).start()

    def _children(self, model: str) -> ModelMetrics:
        """Label children of one model, created once (they then show at 0) and cached for the hot path."""
        found = self._per_model.get(model)
        if found is None:
            for reason in FAILURE_REASONS:
                self.failures.labels(model, reason)
            self.requests.labels(model, "200")
            for task in REQUEST_TASKS:
                self.task_requests.labels(model, task)
            for task in TASKS:
                self.task_images.labels(model, task)
            found = self._per_model[model] = ModelMetrics(
                forward_duration=self.forward_duration.labels(model),
                batch_size=self.batch_size.labels(model),
                forward_passes=self.forward_passes.labels(model),
                images=self.images.labels(model),
                queue_wait=self.queue_wait.labels(model),
                request_duration=self.request_duration.labels(model),
                queue_depth=self.queue_depth.labels(model),
            )
        return found

    # ------------------------------------------------------------------ scheduler observer (engine thread)

    def on_evaluation(self, model: str, batch_size: int, seconds: float) -> None:
        children = self._children(model)
        children.forward_duration.observe(seconds)
        children.batch_size.observe(batch_size)
        children.forward_passes.inc()

    def on_device_evaluation(self, model: str, device: str, batch_size: int, seconds: float) -> None:
        self._child(self.device_forward_duration, model, device).observe(seconds)
        self._child(self.device_batch_size, model, device).observe(batch_size)

    def on_queue_wait(self, model: str, seconds: float) -> None:
        self._children(model).queue_wait.observe(seconds)

    def on_images_finished(self, model: str, count: int, task: str) -> None:
        self._children(model).images.inc(count)
        self._child(self.task_images, model, task).inc(count)

    # ------------------------------------------------------------------ request outcomes (event loop)

    def observe_request(self, model: str, code: int, seconds: float, reason: str | None,
                        task: str = "generate") -> None:
        """One generate or edit request ended with `code`; `reason` is its failure label (None for success)."""
        self._child(self.requests, model, str(code)).inc()
        self._child(self.task_requests, model, task).inc()
        if reason is not None:
            self._child(self.failures, model, reason).inc()
        if model in self._per_model:
            self._per_model[model].request_duration.observe(seconds)

    def observe_encode(self, fmt: str, seconds: float) -> None:
        self._child(self.encode_duration, fmt).observe(seconds)

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """metric.labels(*labels), looked up once (labels() validates and locks on every call)."""
        key = (metric, *labels)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(*labels)
        return child

    def track_queue_depth(self, model: str, depth: Callable[[], float]) -> None:
        self._live.append((self._children(model).queue_depth, depth))

    def track_in_progress(self, count: Callable[[], int]) -> None:
        """cmserve_requests_in_progress: read from `count` at each scrape in one process (no update per request);
        with several workers each request moves it (`request_started`, `request_ended`) so all see it at once."""
        if not self.multiprocess:
            self.in_progress.set_function(count)

    def request_started(self) -> None:
        if self.multiprocess:
            self.in_progress.inc()

    def request_ended(self) -> None:
        if self.multiprocess:
            self.in_progress.dec()

    def track_ready(self, ready: Callable[[], bool]) -> None:
        self._live.append((self.ready, lambda: 1.0 if ready() else 0.0))

    def refresh(self) -> None:
        """Write the callback gauges' current values (this process's share, with several workers)."""
        for gauge, value in list(self._live):
            gauge.set(value())

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(LIVE_REFRESH_S)
            self.refresh()

    def track_device_memory(self, memory: Callable[[], tuple[int, int] | None], device: str = "0") -> None:
        """cmserve_gpu_memory_*_bytes, registered only for CUDA devices (absent on the CPU): the sum over the
        devices, each counted once (all models on a device share its memory)."""
        if memory() is None or device in self._memory:
            return
        if not self._memory:
            allocated = Gauge("cmserve_gpu_memory_allocated_bytes", "Device memory held by tensors",
                              registry=self.registry)
            reserved = Gauge("cmserve_gpu_memory_reserved_bytes", "Device memory reserved by the allocator",
                             registry=self.registry)
            allocated.set_function(lambda: self._memory_total(0))
            reserved.set_function(lambda: self._memory_total(1))
        self._memory[device] = memory

    def _memory_total(self, which: int) -> int:
        return sum((memory() or (0, 0))[which] for memory in list(self._memory.values()))

    def set_model_info(self, model: str, sha256: str, preset: str | None) -> None:
        self.model_info.labels(model, sha256, preset or "").set(1)

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self._readable()), CONTENT_TYPE_LATEST

    def _readable(self) -> CollectorRegistry:
        """Current values: this registry, or with several workers, the files of all of them."""
        self.refresh()
        if not self.multiprocess:
            return self.registry
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return merged

    @staticmethod
    def _totals(registry: CollectorRegistry, names: Iterable[str]) -> dict[str, float]:
        totals = dict.fromkeys(names, 0.0)
        for family in registry.collect():
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
        return totals

    def stats(self, ready: bool) -> dict[str, float | int | bool]:
        """The playground's summary: rates over the last ~10 s and the current state, from the metrics above."""
        now = time.monotonic()
        names = ("cmserve_requests_total", "cmserve_images_generated_total", "cmserve_batch_size_sum",
                 "cmserve_batch_size_count", "cmserve_queue_depth", "cmserve_requests_in_progress")
        totals = self._totals(self._readable(), names)  # one read of every worker's files
        current = tuple(totals[name] for name in names[:4])
        with self._stats_lock:
            samples = self._samples
            if not samples or now - samples[-1][0] >= 0.5:
                samples.append((now, *current))
            while len(samples) > 1 and now - samples[1][0] >= STATS_WINDOW_S:
                samples.popleft()
            t0, *first = samples[0]
        span = now - t0
        requests, images, batch_sum, batch_count = (c - f for c, f in zip(current, first, strict=True))
        if not batch_count:  # nothing ran in the window: the mean since start
            batch_sum, batch_count = current[2], current[3]
        return {
            "requests_per_s": round(requests / span, 3) if span > 0 else 0.0,
            "images_per_s": round(images / span, 3) if span > 0 else 0.0,
            "queue_depth": int(totals["cmserve_queue_depth"]),
            "mean_images_per_forward": round(batch_sum / batch_count, 3) if batch_count else 0.0,
            "ready": ready,
            "in_progress": int(totals["cmserve_requests_in_progress"]),
        }
