"""Several devices (CM_DEVICES): their settings and labels, and the scheduler with one engine thread per device,
each with its own copy of the network: the same images on either, batches spread over both, failures and stopping.
Two CPU "devices" stand in for GPUs."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from models.consistency import ConsistencyModel
from models.sampling import sample, to_uint8
from service.engine import Engine, device_labels
from service.errors import DeadlineExceeded, EngineFailure, NotReady
from service.metrics import Metrics
from service.scheduler import Job, Scheduler, SchedulerObserver
from service.settings import SettingsError, load_settings
from tests.unit.service.test_metrics import value
from tests.unit.service.test_scheduler import FOUR, ONE, TWO, FakeEngine, Finished, make_job

# ---------------------------------------------------------------------- settings and labels


def test_devices_default_to_cm_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_DEVICE", "cpu")
    assert load_settings().device_names == ["cpu"]
    monkeypatch.delenv("CM_DEVICE")
    monkeypatch.setenv("CM_DEVICES", "cuda:0, cuda:1")
    assert load_settings().device_names == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CM_DEVICES": "cpu,tpu"}, "CM_DEVICES: CM_DEVICES items ['tpu'] are not one of cpu, cuda, cuda:N"),
        ({"CM_DEVICES": "auto,cpu"}, "CM_DEVICES items ['auto'] are not one of"),
        ({"CM_DEVICES": "cuda:0,cuda"}, "CM_DEVICES names ['cuda:0'] more than once"),
        ({"CM_DEVICES": "cpu,cuda:0"}, "CM_DEVICES mixes the CPU and CUDA devices"),
        ({"CM_DEVICES": "cpu,cpu", "CM_DEVICE": "cpu"}, "CM_DEVICE='cpu' and CM_DEVICES='cpu,cpu' are both set"),
        ({"CM_DEVICES": "cpu,cpu", "CM_WORKERS": "2"}, "CM_WORKERS=2 with CM_DEVICES='cpu,cpu'"),
        ({"CM_DEVICES": ",".join(["cpu"] * 65)}, "at most 64 are allowed"),
    ],
)
def test_bad_devices_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert message in str(e.value)


def test_device_labels_are_bounded_and_tell_repeated_devices_apart() -> None:
    assert device_labels(["cpu"]) == ["cpu"]
    assert device_labels(["cpu", "cpu"]) == ["cpu:0", "cpu:1"]
    assert device_labels(["cuda", "cuda:1"]) == ["cuda:0", "cuda:1"]


def test_metrics_have_series_per_device_from_the_start() -> None:
    metrics = Metrics(["digits"], batch_buckets=[1, 8], devices=["cpu:0", "cpu:1"])
    for device in ("cpu:0", "cpu:1"):
        assert value(metrics, "cmserve_device_batch_size_count", model="digits", device=device) == 0
    metrics.on_device_evaluation("digits", "cpu:1", 8, 0.004)
    assert value(metrics, "cmserve_device_batch_size_sum", model="digits", device="cpu:1") == 8
    assert value(metrics, "cmserve_device_forward_duration_seconds_count", model="digits", device="cpu:1") == 1
    assert value(metrics, "cmserve_device_batch_size_count", model="digits", device="cpu:0") == 0


# ---------------------------------------------------------------------- the scheduler with two devices


class HeldEngine(FakeEngine):
    """The fake engine, which holds each evaluation until `release` is set and says when it holds one."""

    def __init__(self, release: threading.Event, fail: bool = False) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.fail = fail
        self.during = self._hold
        self._release = release

    def _hold(self) -> None:
        self.holding.set()
        assert self._release.wait(30), "never released"
        if self.fail:
            self.fail = False  # once
            raise RuntimeError("injected device fault")


class Devices(SchedulerObserver):
    """Which device evaluated how many images."""

    def __init__(self) -> None:
        self.images: dict[str, int] = {}

    def on_device_evaluation(self, model: str, device: str, batch_size: int, seconds: float) -> None:
        self.images[device] = self.images.get(device, 0) + batch_size


def two_devices(*engines: object, max_batch: int = 64, observer: SchedulerObserver | None = None) -> Scheduler:
    scheduler = Scheduler(max_batch=max_batch, max_wait_s=0.0, max_queue=1000, observer=observer,
                          devices=["cpu:0", "cpu:1"])
    scheduler.add_model("m", *engines)  # type: ignore[arg-type]
    return scheduler


def finishes(job: Job) -> threading.Event:
    """An event set when the job ends."""
    done = threading.Event()
    job.on_done = lambda _: done.set()
    return done


def any_holding(engines: list[HeldEngine], timeout: float = 30) -> bool:
    """Wait until one of the engines holds an evaluation."""
    for _ in range(int(timeout / 0.01)):
        if any(engine.holding.is_set() for engine in engines):
            return True
        threading.Event().wait(0.01)
    return False


def test_a_model_needs_one_engine_per_device() -> None:
    scheduler = Scheduler(max_batch=8, max_wait_s=0.0, max_queue=10, devices=["cpu:0", "cpu:1"])
    with pytest.raises(ValueError, match="1 engine"):
        scheduler.add_model("m", FakeEngine())
    with pytest.raises(ValueError, match="distinct labels"):
        Scheduler(max_batch=8, max_wait_s=0.0, max_queue=10, devices=["cpu", "cpu"])


def test_a_seed_gives_the_same_image_on_either_device(tiny_model: ConsistencyModel) -> None:
    engines = [Engine(tiny_model), Engine(copy.deepcopy(tiny_model))]
    scheduler = two_devices(*engines, max_batch=2)
    first, second, split = make_job(5, 2, TWO), make_job(5, 2, TWO), make_job(5, 4, TWO)
    scheduler.submit(first)
    while scheduler.run_once(block=False, device=0):
        pass
    scheduler.submit(second)
    while scheduler.run_once(block=False, device=1):
        pass
    scheduler.submit(split)  # its images and steps alternate between the devices, two at a time
    device = 0
    while scheduler.run_once(block=False, device=device):
        device = 1 - device
    assert torch.equal(first.result, second.result)  # bit for bit: same batches, either device
    assert torch.equal(first.result, sample(tiny_model, [5, 6], TWO))
    np.testing.assert_array_equal(split.images, to_uint8(sample(tiny_model, [5, 6, 7, 8], TWO)))
    np.testing.assert_array_equal(split.images[:2], first.images)


def test_the_next_free_device_takes_the_next_batch() -> None:
    release = threading.Event()
    engines = [HeldEngine(release), HeldEngine(release)]
    observer = Devices()
    scheduler = two_devices(*engines, observer=observer)
    scheduler.start()
    try:
        jobs = [make_job(1, 2, ONE), make_job(2, 3, ONE)]
        done = [finishes(job) for job in jobs]
        scheduler.submit(jobs[0])
        assert any_holding(engines), "no device took the first job"
        scheduler.submit(jobs[1])  # one device holds the first batch: the other takes this one
        assert all(e.holding.wait(30) for e in engines), "the second device never took a batch"
        release.set()
        assert all(d.wait(30) for d in done)
    finally:
        release.set()
        scheduler.stop()
    assert all(job.error is None for job in jobs)
    assert sorted(observer.images.values()) == [2, 3] and set(observer.images) == {"cpu:0", "cpu:1"}


def test_a_failure_on_one_device_fails_its_batch_and_both_serve_on() -> None:
    release = threading.Event()
    engines = [HeldEngine(release), HeldEngine(release, fail=True)]
    scheduler = two_devices(*engines)
    release.set()
    healthy, failing = make_job(1, 1, ONE), make_job(2, 1, ONE)
    scheduler.submit(healthy)
    assert scheduler.run_once(block=False, device=0)
    scheduler.submit(failing)
    assert scheduler.run_once(block=False, device=1)  # device 1 fails this one evaluation
    assert healthy.error is None and isinstance(failing.error, EngineFailure)
    for device in (1, 0):
        again = make_job(4, 1, ONE, on_done=Finished())
        scheduler.submit(again)
        assert scheduler.run_once(block=False, device=device)
        assert again.finished and again.error is None


def test_stop_lets_both_devices_finish_and_fails_what_waits() -> None:
    release = threading.Event()
    engines = [HeldEngine(release), HeldEngine(release)]
    scheduler = two_devices(*engines, max_batch=1)
    scheduler.start()
    on_device = [make_job(1, 1, ONE), make_job(2, 1, ONE)]
    waiting = make_job(3, 1, FOUR)
    for job in on_device:
        scheduler.submit(job)
    assert all(e.holding.wait(30) for e in engines), "both devices should hold an evaluation"
    scheduler.submit(waiting)
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    release.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert all(job.finished and job.error is None for job in on_device)
    assert isinstance(waiting.error, NotReady)
    assert all(device.thread is not None and not device.thread.is_alive() for device in scheduler._devices)


def test_retry_after_counts_every_device() -> None:
    release = threading.Event()
    one = Scheduler(max_batch=1, max_wait_s=0.0, max_queue=1000)
    one.add_model("m", HeldEngine(release))
    two = two_devices(HeldEngine(release), HeldEngine(release), max_batch=1)
    for scheduler in (one, two):
        scheduler._evaluation_s = 1.0
        scheduler.submit(make_job(1, 8, ONE))
    with one._cond, two._cond:
        assert (one._retry_after_locked(), two._retry_after_locked()) == (8, 4)


def test_a_job_evaluated_whole_then_in_parts_keeps_its_images(tiny_model: ConsistencyModel) -> None:
    """Two devices requeue in any order, so a job whole in one batch (its estimates then rows of the engine's
    output, an inference tensor) can be split in a later one: those rows are copied before being written in."""
    scheduler = two_devices(Engine(tiny_model), Engine(copy.deepcopy(tiny_model)), max_batch=4)
    job = make_job(21, 3, TWO)
    scheduler.submit(job)
    assert scheduler.run_once(block=False, device=0)  # all 3 images: step 1
    scheduler.max_batch = 2  # as if another device's images went ahead of them
    while scheduler.run_once(block=False, device=1):
        pass
    assert job.error is None
    np.testing.assert_array_equal(job.images, to_uint8(sample(tiny_model, [21, 22, 23], TWO)))


def test_deadlines_and_cancellation_hold_on_every_device() -> None:
    engines = [FakeEngine(), FakeEngine()]
    scheduler = two_devices(*engines)
    late, gone, kept = make_job(1, 2, ONE, deadline=0.0), make_job(2, 2, TWO), make_job(3, 1, ONE)
    for job in (late, gone, kept):
        scheduler.submit(job)
    assert scheduler.cancel(gone, NotReady("cancelled by the test"))
    assert scheduler.run_once(block=False, device=1)
    assert isinstance(late.error, DeadlineExceeded) and kept.error is None and kept.finished
    assert engines[1].sizes == [1] and engines[0].sizes == []  # only the kept image was evaluated
