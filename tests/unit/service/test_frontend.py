"""CM_FRONTENDS' seam: the wire messages round trip, and a RemoteScheduler against a real EngineHost in-process
(a real Scheduler and its engine thread, with the small fake engine of test_scheduler.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

from models.checkpoint import CheckpointMeta
from models.config import preset
from models.consistency import ConsistencyModel
from service import wire
from service.api.edit import Edit, EncodedImage
from service.engine import Engine as RealEngine
from service.enginehost import EngineHost
from service.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineFailure,
    InvalidRequest,
    OutOfMemory,
    QueueFull,
    ServiceError,
)
from service.frontend import RemoteScheduler
from service.scheduler import EngineLike, Job, Scheduler
from tests.unit.service.api.test_edit import png
from tests.unit.service.test_scheduler import TWO, FakeEngine, drain, make_job, scheduler_for

TINY_META = CheckpointMeta(config=preset("digits").replace(model_channels=16, num_groups=4)).to_json()
GREY = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4


def test_a_submit_with_an_edit_and_an_interpolation_round_trips() -> None:
    mask = EncodedImage(png(GREY), "mask", 8, 8, "L")
    edit = Edit("inpaint", EncodedImage(png(GREY), "image", 8, 8, "L"), mask=mask, box=None)
    job = Job("m", [80.0, 0.5], 7, 3, 2, 123.5, task="inpaint", edit=edit, noised_start=False,
              interpolation=(9, [0.0, 0.5, 1.0]))
    message = wire.decode_to_engine(wire.encode(wire.submit_message(4, job)))
    assert isinstance(message, wire.Submit) and message.id == 4
    back = wire.job_of(message)
    for name in ("model", "sigmas", "seed", "n", "class_label", "deadline", "task", "noised_start", "edit"):
        assert getattr(back, name) == getattr(job, name), name
    assert back.interpolation == (9, [0.0, 0.5, 1.0])
    (projection, start), (projection2, start2) = edit(), back.edit()  # type: ignore[misc]
    assert torch.equal(start, start2) and projection is not None and projection2 is not None


def test_a_box_edit_builds_the_same_projection_after_the_crossing() -> None:
    edit = Edit("inpaint", EncodedImage(png(GREY), "image", 8, 8, "L"), box=(0, 4, 8, 8))
    back = wire.job_of(wire.decode_to_engine(wire.encode(wire.submit_message(0, Job(
        "m", [80.0], 1, 1, None, 1.0, task="inpaint", edit=edit)))))  # type: ignore[arg-type]
    assert back.edit == edit
    assert torch.equal(edit()[1], back.edit()[1])  # type: ignore[misc]
    assert edit.omega()[4:].all() and not edit.omega()[:4].any()


@pytest.mark.parametrize("error", [
    QueueFull("the queue holds 9 images", retry_after_s=7),
    DeadlineExceeded("the request's deadline passed"),
    wire.ERRORS["OutOfMemory"]("the device ran out of memory even for one image"),
    wire.ERRORS["NotReady"]("the server is shutting down"),
    wire.ERRORS["Draining"]("draining"),
    EngineFailure("the network evaluation failed (RuntimeError)"),
    InvalidRequest("image: not a PNG, JPEG or WebP image (OSError)", field="image"),
    Cancelled("the client disconnected"),
], ids=lambda e: type(e).__name__)
def test_every_error_keeps_its_class_message_field_and_retry_after(error: ServiceError) -> None:
    result = wire.Result(1, wire.error_message(error), None, 1.0, None, 2.0)
    back = wire.decode_to_frontend(wire.encode(result))
    assert isinstance(back, wire.Result) and back.error is not None
    crossed = wire.service_error(back.error)
    assert type(crossed) is type(error)
    assert (crossed.message, crossed.field, crossed.reason) == (error.message, error.field, error.reason)
    assert getattr(crossed, "retry_after_s", None) == getattr(error, "retry_after_s", None)


def test_an_error_of_another_class_crosses_as_an_engine_failure() -> None:
    crossed = wire.service_error(wire.error_message(ServiceError("odd")))
    assert type(crossed) is EngineFailure and crossed.message == "odd"


def test_a_finished_job_crosses_with_its_pixels_labels_and_timings() -> None:
    scheduler = scheduler_for(FakeEngine())
    job = make_job(3, 2, TWO)
    scheduler.submit(job)
    drain(scheduler)
    frames = wire.result_frames(5, job, queue_depth=11)
    result = wire.decode_to_frontend(bytes(frames[0]))
    assert isinstance(result, wire.Result)
    local = Job("m", list(TWO), 3, 2, None, 1e12)
    wire.complete(local, result, bytes(frames[1]))
    assert np.array_equal(local.images, job.images) and local.labels == job.labels and local.error is None
    assert (local.submitted_at, local.started_at, local.finished_at) == (job.submitted_at, job.started_at,
                                                                         job.finished_at)
    assert result.queue_depth == 11


# ---------------------------------------------------------------------- a RemoteScheduler and an EngineHost


class Engine(FakeEngine):
    """The fake engine, held inside an evaluation while `gate` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()

        def during() -> None:
            self.inside.set()
            assert self.gate.wait(30)

        self.during = during


@contextlib.contextmanager
def hosting(engine: EngineLike, folder: Path, max_queue: int = 6) -> Iterator[tuple[str, Scheduler]]:
    """An EngineHost serving model m on `engine` (a started Scheduler) at an ipc address in `folder`."""
    scheduler = Scheduler(max_batch=64, max_wait_s=0.0, max_queue=max_queue)
    scheduler.add_model("m", engine)
    scheduler.start()
    address = f"ipc://{folder}/engine"
    context = zmq.Context()
    meta = CheckpointMeta.from_json(TINY_META)
    host = EngineHost(scheduler, lambda: wire.Description(
        [wire.ModelDescription("m", meta.to_json(), "/m.safetensors", "ab" * 32, 4)], "m"), address, context)
    stop = threading.Event()
    thread = threading.Thread(target=host.serve, args=(stop.is_set,), daemon=True)
    thread.start()
    try:
        yield address, scheduler
    finally:
        stop.set()
        thread.join(10)
        scheduler.stop()
        host.close()
        context.term()


@pytest.fixture
def engine_host(tmp_path: Path) -> Iterator[tuple[str, Scheduler, Engine]]:
    engine = Engine()
    with hosting(engine, tmp_path) as (address, scheduler):
        yield address, scheduler, engine
        engine.gate.set()


def remote_run(address: str, body: object) -> object:
    """Run `body(remote, described)` on an event loop with a started RemoteScheduler."""
    async def main() -> object:
        context = zmq.asyncio.Context()
        remote = RemoteScheduler(address, context)
        described: asyncio.Future[wire.Description] = asyncio.get_running_loop().create_future()
        remote.start(described.set_result)
        try:
            return await body(remote, await asyncio.wait_for(described, 10))  # type: ignore[operator]
        finally:
            remote.stop()
            context.term()
    return asyncio.run(main())


async def answered(remote: RemoteScheduler, jobs: list[Job], timeout: float = 10) -> None:
    """Submit the jobs through the remote scheduler and wait until each is answered."""
    waits = []
    for job in jobs:
        done = asyncio.get_running_loop().create_future()
        job.on_done = done.set_result
        remote.submit(job)
        waits.append(done)
    await asyncio.wait_for(asyncio.gather(*waits), timeout)


def test_jobs_come_back_as_the_local_scheduler_makes_them(engine_host: tuple[str, Scheduler, Engine]) -> None:
    address, _, _ = engine_host
    local = scheduler_for(FakeEngine())
    expected = [make_job(seed, n, TWO) for seed, n in ((1, 2), (5, 1))]
    for job in expected:
        local.submit(job)
    drain(local)

    async def body(remote: RemoteScheduler, described: wire.Description) -> None:
        assert [m.name for m in described.models] == ["m"] and described.default == "m"
        jobs = [Job("m", list(TWO), job.seed, job.n, None, 1e12) for job in expected]
        await answered(remote, jobs)
        for job, want in zip(jobs, expected, strict=True):
            assert job.error is None and job.finished
            assert np.array_equal(job.images, want.images) and job.class_labels == want.class_labels
            assert job.submitted_at <= job.started_at <= job.finished_at  # type: ignore[operator]
        assert remote.cancel(jobs[0], Cancelled("late")) is False  # finished: its result stands

    remote_run(address, body)


def test_a_full_queue_a_deadline_and_a_cancel_cross_back(engine_host: tuple[str, Scheduler, Engine]) -> None:
    address, scheduler, engine = engine_host
    engine.gate.clear()

    async def body(remote: RemoteScheduler, described: wire.Description) -> None:
        loop = asyncio.get_running_loop()

        async def run(job: Job) -> Job:
            done = loop.create_future()
            job.on_done = lambda j: done.done() or done.set_result(j)
            remote.submit(job)
            return await asyncio.wait_for(done, 10)

        held = Job("m", list(TWO), 1, 1, None, 1e12)
        held_task = loop.create_task(run(held))
        await loop.run_in_executor(None, engine.inside.wait, 10)  # the held job is on the device
        queued = Job("m", list(TWO), 2, 6, None, 1e12)
        queued_task = loop.create_task(run(queued))
        while scheduler.queue_depth() < 6:
            await asyncio.sleep(0.01)
        full = await run(Job("m", list(TWO), 3, 1, None, 1e12))
        assert isinstance(full.error, QueueFull) and full.error.retry_after_s >= 1
        assert remote.cancel(queued, Cancelled("the client disconnected")) is True
        assert isinstance((await queued_task).error, Cancelled)
        while scheduler.queue_depth():  # the engine process dropped its images
            await asyncio.sleep(0.01)
        expired_task = loop.create_task(run(Job("m", list(TWO), 4, 1, None, 0.0)))
        engine.gate.set()  # the engine drops the expired job when it next takes a batch
        assert (await held_task).error is None
        expired = await expired_task
        assert isinstance(expired.error, DeadlineExceeded) and "deadline" in expired.error.message

    remote_run(address, body)



def test_an_image_out_of_memory_fails_its_request_alone_across_the_boundary(
        engine_host: tuple[str, Scheduler, Engine]) -> None:
    """The engine process halves and retries a batch that runs out of memory (service/engine.py); an image that
    fails even alone fails its request with OutOfMemory (503, reason oom), and the others in its batches finish."""
    address, _, engine = engine_host
    engine.fail_label = 9

    async def body(remote: RemoteScheduler, described: wire.Description) -> None:
        jobs = [Job("m", list(TWO), 1, 2, 9, 1e12), Job("m", list(TWO), 2, 2, 3, 1e12)]
        await answered(remote, jobs)
        failed, fine = jobs
        assert isinstance(failed.error, OutOfMemory) and failed.error.reason == "oom"
        assert fine.error is None and fine.images.shape[0] == 2

    remote_run(address, body)


def test_out_of_memory_above_two_images_halves_the_batches_and_every_request_succeeds(tmp_path: Path) -> None:
    """Reliability acceptance test 10 across the front end's boundary: the real engine in the engine process runs
    out of memory above two images, halves its batches, and every request's images are those of a plain run."""
    class OOMAboveTwo(RealEngine):
        def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("injected: out of memory above two images")
            return super()._forward(x, sigma, labels)

    model = ConsistencyModel.from_config(CheckpointMeta.from_json(TINY_META).config)
    engine = OOMAboveTwo(model)
    specs = [(3, 3, TWO), (30, 1, TWO), (300, 4, TWO)]
    local = scheduler_for(RealEngine(model))
    expected = [make_job(seed, n, sigmas) for seed, n, sigmas in specs]
    for job in expected:
        local.submit(job)
    drain(local)

    async def body(remote: RemoteScheduler, described: wire.Description) -> None:
        jobs = [Job("m", list(sigmas), seed, n, None, 1e12) for seed, n, sigmas in specs]
        await answered(remote, jobs, timeout=30)
        for job, want in zip(jobs, expected, strict=True):
            assert job.error is None
            np.testing.assert_array_equal(job.images, want.images)

    with hosting(engine, tmp_path, max_queue=64) as (address, _):
        remote_run(address, body)
    assert engine.oom_splits > 0


def test_a_message_that_does_not_decode_is_logged_and_the_engine_goes_on(
        engine_host: tuple[str, Scheduler, Engine], caplog: pytest.LogCaptureFixture) -> None:
    address, _, _ = engine_host
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    try:
        sock.send(b"\xc1 not msgpack")
        sock.send(wire.encode(wire.Submit(1, "m", [80.0], 1, 1, None, "soon", "generate")))  # type: ignore[arg-type]
        sock.send(wire.encode(wire.Describe()))
        assert sock.poll(10_000), "no answer"
        assert isinstance(wire.decode_to_frontend(sock.recv()), wire.Description)
    finally:
        sock.close(0)
        context.term()
    assert sum("could not be decoded" in r.getMessage() for r in caplog.records) == 2
