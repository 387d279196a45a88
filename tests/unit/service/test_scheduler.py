"""The scheduler alone: per-evaluation batching, exact seeded sampling, fairness, bound, deadline, cancel, OOM,
and when a batch runs. Scheduling is tested on a fake engine; the real one checks the images bit for bit."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from models.consistency import ConsistencyModel
from models.editing import Projection, inpainting
from models.sampling import image_class_label, sample, to_uint8
from service.batching import COMING_BACK
from service.engine import Engine, Evaluation
from service.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineFailure,
    InvalidRequest,
    NotReady,
    OutOfMemory,
    QueueFull,
)
from service.scheduler import (
    CAME_BACK_WEIGHT,
    MAX_IN_FLIGHT,
    PREPARE_AHEAD,
    STARVATION_EVALUATIONS,
    Arrivals,
    EngineLike,
    Job,
    Scheduler,
    SchedulerObserver,
)

ONE = [80.0]
TWO = [80.0, 0.821]
FOUR = [80.0, 17.5, 2.5, 0.17]


class FakeEngine(EngineLike):
    """f(x, σ) = x / (1 + σ), image by image; records each evaluation's σ and labels; rows labelled `fail_label`
    fail as if out of memory; `during` runs inside each evaluation. Asynchronous, it is a device whose batches
    are done only when the test says so (`done`), in order."""

    image_shape = (1, 2, 2)
    num_classes = 10
    sigma_min = 0.002

    def __init__(self, fail_label: int | None = None, asynchronous: bool = False) -> None:
        self.calls: list[tuple[list[float], list[int]]] = []  # (σ per image, label per image)
        self.during = lambda: None
        self.fail_label = fail_label
        self._asynchronous = asynchronous
        self.fences: list[threading.Event] = []  # asynchronous: one per launched batch, set when it is done
        self._finished = 0  # asynchronous: how many batches, in launch order, the test has said are done
        self._lock = threading.Lock()

    @property
    def asynchronous(self) -> bool:
        return self._asynchronous

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def fence(self) -> Any:
        if not self._asynchronous:
            return lambda: None
        event = threading.Event()
        with self._lock:
            self.fences.append(event)
            if len(self.fences) <= self._finished:
                event.set()
        return lambda: event.wait(10)

    def done(self, batches: int = 1) -> None:
        """Asynchronous: the device finishes its next `batches` batches, in launch order; one whose evaluation has
        begun but whose fence the engine thread has not taken yet is done as soon as it takes it."""
        with self._lock:
            self._finished += batches
            for event in self.fences[: self._finished]:
                event.set()

    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Evaluation:
        self.calls.append((sigma.tolist(), [] if labels is None else labels.tolist()))
        self.during()
        failed = [row for row, label in enumerate(self.calls[-1][1]) if label == self.fail_label]
        return Evaluation(out=(x / (1 + sigma.view(-1, 1, 1, 1))).clamp(-1, 1), failed=failed)

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s, _ in self.calls]


class RecordingEngine(Engine):
    """The real engine, recording the batch size of each network call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return super()._forward(x, sigma, labels)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Finished:
    """Collects on_done calls."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def __call__(self, job: Job) -> None:
        self.jobs.append(job)


def make_job(seed: int, n: int, sigmas: list[float], deadline: float = 1e12, name: str = "m", on_done: Any = None,
             class_label: int | None = None) -> Job:
    return Job(name, list(sigmas), seed, n, class_label, deadline, on_done or Finished())


def scheduler_for(engine: EngineLike, max_batch: int = 64, max_queue: int = 1000, clock: FakeClock | None = None,
                  observer: SchedulerObserver | None = None, schedule: str = "shortest") -> Scheduler:
    kwargs = {"clock": clock} if clock else {}
    scheduler = Scheduler(max_batch=max_batch, max_wait_s=0.0, max_queue=max_queue, observer=observer,
                          schedule=schedule, **kwargs)
    scheduler.add_model("m", engine)
    return scheduler


def drain(scheduler: Scheduler) -> int:
    """Run evaluations until the queue is empty; how many ran."""
    count = 0
    while scheduler.run_once(block=False):
        count += 1
    return count


def reference(model: ConsistencyModel, seed: int, n: int, sigmas: list[float]) -> torch.Tensor:
    return sample(model, [seed + i for i in range(n)], sigmas)


def alone(seed: int, n: int, sigmas: list[float], class_label: int | None = None) -> torch.Tensor:
    """The job's images when it has a fake engine to itself."""
    scheduler = scheduler_for(FakeEngine())
    job = make_job(seed, n, sigmas, class_label=class_label)
    scheduler.submit(job)
    drain(scheduler)
    return job.result


def assert_counts(scheduler: Scheduler) -> None:
    """Model m's counts agree with what its queue holds."""
    lane = scheduler._lanes["m"]
    assert lane.queued == sum(run.size for run in lane.runs()) == scheduler.queue_depth("m")
    assert lane.evaluations == sum(run.evaluations_left for run in lane.runs())


# ---------------------------------------------------------------------- the images (the real engine)


def test_a_job_alone_is_exactly_models_sampling(tiny_model: ConsistencyModel) -> None:
    scheduler = scheduler_for(Engine(tiny_model))
    job = make_job(123, 5, FOUR)
    scheduler.submit(job)
    assert drain(scheduler) == 4  # one evaluation per step
    assert job.finished and job.error is None
    assert torch.equal(job.result, reference(tiny_model, 123, 5, FOUR))  # bit for bit


def test_finished_images_come_as_uint8_with_their_labels(tiny_model: ConsistencyModel) -> None:
    scheduler = scheduler_for(Engine(tiny_model))
    drawn, fixed = make_job(40, 3, TWO), make_job(50, 2, ONE, class_label=6)
    scheduler.submit(drawn)
    scheduler.submit(fixed)
    drain(scheduler)
    np.testing.assert_array_equal(drawn.images, to_uint8(drawn.result))
    np.testing.assert_array_equal(drawn.images, to_uint8(reference(tiny_model, 40, 3, TWO)))
    assert drawn.class_labels == [image_class_label(40 + i, 10) for i in range(3)]
    assert fixed.class_labels == [6, 6]
    np.testing.assert_array_equal(
        fixed.images, to_uint8(sample(tiny_model, [50, 51], ONE, class_labels=[6, 6]))
    )


def test_mixed_batches_give_the_same_images(tiny_model: ConsistencyModel) -> None:
    engine = RecordingEngine(tiny_model)
    scheduler = scheduler_for(engine, max_batch=5)  # forces runs to split across evaluations
    specs = [(7, 3, FOUR), (1000, 1, ONE), (42, 4, TWO), (9, 2, ONE), (77, 3, FOUR)]
    jobs = [make_job(seed, n, sig) for seed, n, sig in specs]
    for job in jobs:
        scheduler.submit(job)
        assert_counts(scheduler)
    while scheduler.run_once(block=False):
        assert_counts(scheduler)
    assert max(engine.sizes) == 5 and sum(engine.sizes) == sum(n * len(sig) for _, n, sig in specs)
    for job, (seed, n, sig) in zip(jobs, specs, strict=True):
        assert job.error is None
        np.testing.assert_array_equal(to_uint8(job.result), to_uint8(reference(tiny_model, seed, n, sig)))


def test_injected_oom_splits_the_batch_and_every_request_succeeds(tiny_model: ConsistencyModel) -> None:
    class OOMAboveTwo(RecordingEngine):
        def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            if x.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return super()._forward(x, sigma, labels)

    engine = OOMAboveTwo(tiny_model)
    scheduler = scheduler_for(engine, max_batch=8)
    specs = [(3, 3, TWO), (30, 1, ONE), (300, 3, FOUR)]
    jobs = [make_job(seed, n, sig) for seed, n, sig in specs]
    for job in jobs:
        scheduler.submit(job)
    drain(scheduler)
    assert engine.oom_splits > 0 and max(engine.sizes) == 2
    for job, (seed, n, sig) in zip(jobs, specs, strict=True):
        assert job.error is None
        np.testing.assert_array_equal(to_uint8(job.result), to_uint8(reference(tiny_model, seed, n, sig)))


# ---------------------------------------------------------------------- batches and their order (a fake engine)


def test_a_job_is_the_same_alone_or_split_across_mixed_batches() -> None:
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch=5)
    specs = [(7, 3, FOUR, None), (1000, 1, ONE, 2), (42, 4, TWO, None), (9, 2, ONE, None), (77, 3, FOUR, 5)]
    jobs = [make_job(seed, n, sig, class_label=label) for seed, n, sig, label in specs]
    for job in jobs:
        scheduler.submit(job)
    drain(scheduler)
    assert max(engine.sizes) == 5
    for job, (seed, n, sig, label) in zip(jobs, specs, strict=True):
        assert torch.equal(job.result, alone(seed, n, sig, label))


def test_one_evaluation_holds_every_image_with_its_own_sigma() -> None:
    engine = FakeEngine()
    scheduler = scheduler_for(engine)
    two, one = make_job(1, 2, TWO), make_job(50, 1, ONE)
    scheduler.submit(two)
    scheduler.submit(one)
    assert drain(scheduler) == 2
    sigma32 = torch.tensor(TWO, dtype=torch.float32).tolist()
    assert engine.calls[0][0] == [sigma32[0]] * 3  # both requests' first step, one evaluation
    assert engine.calls[1][0] == [sigma32[1]] * 2  # only the 2-step request's second step
    assert engine.calls[0][1] == one.labels + two.labels  # fewest evaluations left first


def test_a_one_step_request_does_not_wait_behind_four_step_requests() -> None:
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch=16)
    done = Finished()
    long_jobs = [make_job(10 * i, 3, FOUR, on_done=done) for i in range(3)]
    for job in long_jobs:
        scheduler.submit(job)
    assert scheduler.run_once(block=False)  # the 4-step requests take their first step
    short = make_job(999, 1, ONE, on_done=done)
    scheduler.submit(short)
    assert scheduler.run_once(block=False)  # the 1-step request joins their second step ...
    assert done.jobs == [short]  # ... and is finished after that single evaluation
    drain(scheduler)
    assert done.jobs == [short, *long_jobs] and len(engine.calls) == 4
    assert torch.equal(short.result, alone(999, 1, ONE))


def test_started_order_puts_continuing_images_before_everything_new() -> None:
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch=2, schedule="started")
    first, second = make_job(1, 2, TWO), make_job(2, 2, ONE)
    scheduler.submit(first)
    scheduler.submit(second)
    drain(scheduler)
    sig = torch.tensor(TWO, dtype=torch.float32).tolist()
    assert [s for s, _ in engine.calls] == [[sig[0]] * 2, [sig[1]] * 2, [80.0] * 2]  # started work finishes first


def test_shortest_order_serves_fewest_evaluations_left_first() -> None:
    """A full batch: new 1-step images go before started 4-step images with 3 to go, which go before new 4-step
    ones; among equals a requeued image is in front of a new one; every image is still the image made alone."""
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch=2)
    sig4 = torch.tensor(FOUR, dtype=torch.float32).tolist()
    long_a = make_job(1, 2, FOUR)
    scheduler.submit(long_a)
    assert scheduler.run_once(block=False)  # long_a's first step: 3 evaluations left now
    long_b, short = make_job(5, 2, FOUR), make_job(9, 2, ONE)
    scheduler.submit(long_b)
    scheduler.submit(short)
    drain(scheduler)
    order = [s for s, _ in engine.calls]
    assert order[:3] == [[sig4[0]] * 2, [80.0] * 2, [sig4[1]] * 2]  # short first, then long_a's second step
    assert order[3:] == [[sig4[2]] * 2, [sig4[3]] * 2, *([[sig4[i]] * 2 for i in range(4)])]  # long_a ends first
    for job, seed, n, sig in ((long_a, 1, 2, FOUR), (long_b, 5, 2, FOUR), (short, 9, 2, ONE)):
        assert torch.equal(job.result, alone(seed, n, sig))


def test_shortest_order_does_not_starve_long_requests() -> None:
    """A stream of 1-step requests that alone fills every batch: a 4-step request still goes once it has waited
    STARVATION_EVALUATIONS evaluations' time, and then keeps going first until it is done."""
    clock = FakeClock()
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch=1, clock=clock)
    engine.during = lambda: setattr(clock, "now", clock.now + 0.01)  # each evaluation takes 10 ms
    long = make_job(3, 1, FOUR)
    scheduler.submit(long)
    scheduler.submit(make_job(100, 1, ONE))
    evaluations = 0
    while not long.finished:
        scheduler.submit(make_job(200 + evaluations, 1, ONE))  # always a 1-step image waiting
        assert scheduler.run_once(block=False)
        evaluations += 1
        assert evaluations <= STARVATION_EVALUATIONS + 6, "the 4-step request starved"
    assert long.error is None and evaluations > STARVATION_EVALUATIONS  # it did wait behind the 1-step stream
    assert torch.equal(long.result, alone(3, 1, FOUR))


def test_models_take_turns() -> None:
    a, b = FakeEngine(), FakeEngine()
    scheduler = Scheduler(max_batch=8, max_wait_s=0.0, max_queue=100)
    scheduler.add_model("a", a)
    scheduler.add_model("b", b)
    scheduler.submit(make_job(1, 2, FOUR, name="a"))
    scheduler.submit(make_job(2, 1, TWO, name="b"))
    order = []
    while scheduler.run_once(block=False):
        order.append(len(a.calls) * 10 + len(b.calls))
    assert order == [10, 11, 21, 22, 32, 42]  # a, b, a, b, then a alone


# ---------------------------------------------------------------------- bound, deadlines, cancel, failures


def test_queue_bound_refuses_at_once_with_retry_after() -> None:
    scheduler = scheduler_for(FakeEngine(), max_queue=5)
    scheduler.submit(make_job(0, 3, ONE))
    full = r"holds 3 images and admits at most 5 \(CM_MAX_QUEUE\); this request has 3"
    with pytest.raises(QueueFull, match=full) as e:
        scheduler.submit(make_job(5, 3, ONE))
    assert e.value.retry_after_s >= 1
    assert scheduler.queue_depth("m") == 3
    scheduler.submit(make_job(9, 2, ONE))  # exactly full is fine
    assert scheduler.queue_depth() == 5
    drain(scheduler)
    assert scheduler.queue_depth() == 0
    scheduler.submit(make_job(5, 3, ONE))  # room again


def test_retry_after_is_the_queued_evaluations_over_a_batch_times_an_evaluation() -> None:
    clock = FakeClock()
    engine = FakeEngine()
    engine.during = lambda: setattr(clock, "now", clock.now + 2.0)  # each evaluation takes 2 s
    scheduler = scheduler_for(engine, max_batch=4, max_queue=8, clock=clock)
    scheduler.submit(make_job(0, 1, ONE))
    drain(scheduler)
    scheduler.submit(make_job(1, 8, FOUR))  # 32 image-evaluations: 8 batches of 4, 16 s
    with pytest.raises(QueueFull) as e:
        scheduler.submit(make_job(2, 1, ONE))
    assert e.value.retry_after_s == 16


def test_expired_images_are_dropped_before_compute() -> None:
    clock = FakeClock()
    engine = FakeEngine()
    scheduler = scheduler_for(engine, clock=clock)
    done = Finished()
    late = make_job(1, 3, ONE, deadline=clock.now + 1, on_done=done)
    scheduler.submit(late)
    clock.now += 2
    assert scheduler.run_once(block=False) is False  # nothing left to run
    assert engine.calls == []  # never reached the network
    assert done.jobs == [late] and isinstance(late.error, DeadlineExceeded)
    assert "3 of 3 images unfinished" in late.error.message
    assert scheduler.queue_depth() == 0
    assert_counts(scheduler)


def test_a_job_that_expires_alone_in_the_queue_is_answered_before_the_engine_thread_sleeps() -> None:
    """The engine thread drops it when it takes the queue; with nothing else to take it must still call on_done
    before it sleeps for more work (not when the next request arrives)."""
    engine = FakeEngine()
    scheduler = scheduler_for(engine)
    answered = threading.Event()
    scheduler.start()
    try:
        assert idle(scheduler)
        late = make_job(1, 1, ONE, deadline=0.0, on_done=lambda _: answered.set())
        scheduler.submit(late)
        assert answered.wait(10) and isinstance(late.error, DeadlineExceeded)
    finally:
        scheduler.stop()
    assert engine.calls == []


def idle(scheduler: Scheduler) -> bool:
    """Wait until the engine thread sleeps for want of work; whether it does."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with scheduler._cond:
            if scheduler._waiting is not None and scheduler._waiting.lane is None:
                return True
        time.sleep(0.001)
    return False


def test_a_deadline_in_mid_flight_drops_the_remaining_steps() -> None:
    clock = FakeClock()
    engine = FakeEngine()
    scheduler = scheduler_for(engine, clock=clock)
    job = make_job(1, 2, FOUR, deadline=clock.now + 1)
    other = make_job(2, 1, TWO)
    scheduler.submit(job)
    scheduler.submit(other)
    scheduler.run_once(block=False)
    scheduler.run_once(block=False)
    clock.now += 5
    drain(scheduler)
    assert isinstance(job.error, DeadlineExceeded) and other.error is None
    assert engine.sizes == [3, 3]  # two evaluations, then the 4-step job's last two steps never ran
    assert_counts(scheduler)


def test_cancel_removes_the_queued_images() -> None:
    engine = FakeEngine()
    scheduler = scheduler_for(engine)
    done = Finished()
    gone, kept = make_job(1, 3, TWO, on_done=done), make_job(2, 2, TWO, on_done=done)
    scheduler.submit(gone)
    scheduler.submit(kept)
    assert scheduler.cancel(gone, Cancelled("client went away"))
    assert scheduler.queue_depth() == 2
    assert_counts(scheduler)
    assert not scheduler.cancel(gone, Cancelled("twice"))  # already ended: no second callback
    drain(scheduler)
    assert engine.sizes == [2, 2]
    assert done.jobs == [gone, kept] and isinstance(gone.error, Cancelled) and kept.error is None


def test_cancel_during_an_evaluation_stops_the_later_steps() -> None:
    engine = FakeEngine()
    scheduler = scheduler_for(engine)
    gone, kept = make_job(1, 2, FOUR), make_job(2, 1, FOUR)
    scheduler.submit(gone)
    scheduler.submit(kept)
    engine.during = lambda: scheduler.cancel(gone, Cancelled("client went away"))
    scheduler.run_once(block=False)
    engine.during = lambda: None
    drain(scheduler)
    assert engine.sizes == [3, 1, 1, 1]
    assert isinstance(gone.error, Cancelled) and kept.error is None
    assert torch.equal(kept.result, alone(2, 1, FOUR))


def test_an_image_that_never_fits_fails_only_its_request() -> None:
    scheduler = scheduler_for(FakeEngine(fail_label=9))
    doomed = make_job(1, 2, TWO, class_label=9)
    fine = make_job(2, 2, TWO, class_label=4)
    scheduler.submit(doomed)
    scheduler.submit(fine)
    drain(scheduler)
    assert isinstance(doomed.error, OutOfMemory) and fine.error is None
    assert torch.equal(fine.result, alone(2, 2, TWO, 4))
    assert scheduler.queue_depth() == 0
    assert_counts(scheduler)


def test_an_engine_fault_fails_that_batch_and_the_server_keeps_serving() -> None:
    engine = FakeEngine()
    scheduler = scheduler_for(engine)

    def fail_once() -> None:
        engine.during = lambda: None
        raise RuntimeError("device fault")

    engine.during = fail_once
    broken = make_job(1, 2, TWO)
    scheduler.submit(broken)
    drain(scheduler)
    assert isinstance(broken.error, EngineFailure) and "RuntimeError" in broken.error.message
    assert_counts(scheduler)
    healthy = make_job(2, 1, ONE)
    scheduler.submit(healthy)
    drain(scheduler)
    assert healthy.error is None


def test_a_job_whose_inputs_cannot_be_made_fails_alone_and_its_batch_goes_on() -> None:
    """An edit's image is decoded as its job is prepared: one that does not decode fails that request with its
    own error (a 422 naming the field), and the other images of the batch are evaluated as if it were not there."""
    engine = FakeEngine()
    scheduler = scheduler_for(engine)

    def undecodable() -> tuple[None, torch.Tensor]:
        raise InvalidRequest("image: not a PNG, JPEG or WebP image (OSError)", field="image")

    bad = Job("m", list(TWO), 3, 2, None, 1e12, Finished(), task="inpaint", edit=undecodable)
    good = [make_job(1, 2, TWO), make_job(7, 1, TWO)]
    for job in (good[0], bad, good[1]):
        scheduler.submit(job)
    assert drain(scheduler) == 2
    assert isinstance(bad.error, InvalidRequest) and bad.error.field == "image" and bad.finished
    assert engine.sizes == [3, 3]  # the good jobs' three images, twice
    for job in good:
        assert job.error is None
        assert torch.equal(job.result, alone(job.seed, job.n, TWO))
    assert_counts(scheduler)


def test_observer_sees_evaluations_waits_and_finished_images() -> None:
    class Recorder(SchedulerObserver):
        def __init__(self) -> None:
            self.batches: list[int] = []
            self.waits = 0
            self.images = 0

        def on_evaluation(self, model: str, batch_size: int, seconds: float) -> None:
            self.batches.append(batch_size)

        def on_queue_wait(self, model: str, seconds: float) -> None:
            self.waits += 1

        def on_images_finished(self, model: str, count: int, task: str) -> None:
            self.images += count

    recorder = Recorder()
    scheduler = scheduler_for(FakeEngine(), observer=recorder)
    scheduler.submit(make_job(1, 3, TWO))
    scheduler.submit(make_job(2, 2, ONE))
    drain(scheduler)
    assert recorder.batches == [5, 3] and recorder.waits == 2 and recorder.images == 5
    assert (scheduler.evaluations, scheduler.images_evaluated) == (2, 8)


def test_stop_fails_what_is_still_queued() -> None:
    scheduler = scheduler_for(FakeEngine())
    done = Finished()
    job = make_job(1, 1, ONE, on_done=done)
    scheduler.submit(job)
    scheduler.stop()
    assert done.jobs == [job] and isinstance(job.error, NotReady)
    with pytest.raises(NotReady):
        scheduler.submit(make_job(2, 1, ONE))


# ---------------------------------------------------------------------- the engine thread and when a batch runs


def held_first_evaluation() -> tuple[FakeEngine, threading.Event, threading.Event]:
    """A fake engine whose first evaluation sets `entered` and waits for `release`."""
    engine = FakeEngine()
    entered, release = threading.Event(), threading.Event()

    def hold_first() -> None:
        engine.during = lambda: None
        entered.set()
        assert release.wait(30)

    engine.during = hold_first
    return engine, entered, release


def test_engine_thread_batches_what_arrived_while_the_device_was_busy() -> None:
    engine, entered, release = held_first_evaluation()
    scheduler = scheduler_for(engine)
    finished = threading.Semaphore(0)
    jobs = [make_job(0, 1, ONE, on_done=lambda _: finished.release())]
    scheduler.start()
    try:
        scheduler.submit(jobs[0])
        assert entered.wait(30)
        for seed in (10, 20, 30):
            jobs.append(make_job(seed, 2, ONE, on_done=lambda _: finished.release()))
            scheduler.submit(jobs[-1])
        release.set()
        for _ in jobs:
            assert finished.acquire(timeout=30)
    finally:
        scheduler.stop()
    assert engine.sizes == [1, 6]  # the three waiting requests shared one evaluation


def wait_until(condition: Any, what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_an_asynchronous_device_takes_the_next_full_batch_while_one_is_in_flight() -> None:
    """A GPU: the engine thread launches a full batch behind the one in flight (MAX_IN_FLIGHT = 2), then waits;
    each batch's requests are answered once the device is done with it, by the finishing thread."""
    engine = FakeEngine(asynchronous=True)
    scheduler = scheduler_for(engine, max_batch=2)
    done = Finished()
    jobs = [make_job(seed, 2, ONE, on_done=done) for seed in (1, 2, 3)]
    scheduler.start()
    try:
        for job in jobs:
            scheduler.submit(job)
        wait_until(lambda: len(engine.calls) == MAX_IN_FLIGHT, "the second full batch was not launched")
        time.sleep(0.05)
        assert len(engine.calls) == MAX_IN_FLIGHT and not done.jobs  # the third waits; none answered yet
        engine.done(1)
        wait_until(lambda: len(engine.calls) == 3 and done.jobs == jobs[:1], "the first batch did not finish")
        engine.done(2)
        wait_until(lambda: len(done.jobs) == 3, "the last batches did not finish")
    finally:
        scheduler.stop()
    for job in jobs:
        assert job.error is None
        torch.testing.assert_close(job.result, alone(job.seed, 2, ONE), rtol=0, atol=0)
        np.testing.assert_array_equal(job.images, to_uint8(job.result))


def test_an_asynchronous_device_holds_a_partial_batch_until_the_one_in_flight_is_done() -> None:
    engine = FakeEngine(asynchronous=True)
    scheduler = scheduler_for(engine, max_batch=4)
    done = Finished()
    first, second = make_job(1, 4, ONE, on_done=done), make_job(2, 1, ONE, on_done=done)
    scheduler.start()
    try:
        scheduler.submit(first)
        wait_until(lambda: len(engine.calls) == 1, "the first batch was not launched")
        scheduler.submit(second)
        time.sleep(0.05)
        assert engine.sizes == [4]  # one image would take a batch from the clients the first is about to answer
        engine.done(1)
        wait_until(lambda: engine.sizes == [4, 1], "the partial batch was not launched after the first")
        engine.done(1)
        wait_until(lambda: done.jobs == [first, second], "the second batch did not finish")
    finally:
        scheduler.stop()


def serve_jobs(scheduler: Scheduler, jobs: list[Job], timeout: float = 30) -> None:
    """Start the scheduler's threads, submit the jobs, wait until each is answered, and stop."""
    finished = threading.Semaphore(0)
    for job in jobs:
        job.on_done = lambda _: finished.release()
    scheduler.start()
    try:
        for job in jobs:
            scheduler.submit(job)
        for _ in jobs:
            assert finished.acquire(timeout=timeout)
    finally:
        scheduler.stop()


def test_multistep_images_on_an_asynchronous_device_are_the_same_as_alone() -> None:
    """Images with steps left are requeued at launch, their estimates taken from the batch still in flight."""
    engine = FakeEngine(asynchronous=True)
    scheduler = scheduler_for(engine, max_batch=5)
    specs = [(7, 3, FOUR), (1000, 1, ONE), (42, 4, TWO), (9, 2, ONE), (77, 3, FOUR)]
    jobs = [make_job(seed, n, sig) for seed, n, sig in specs]
    stop = threading.Event()

    def device() -> None:  # finishes each batch soon after its launch
        while not stop.is_set():
            engine.done(1)
            time.sleep(0.001)

    runner = threading.Thread(target=device, daemon=True)
    runner.start()
    try:
        serve_jobs(scheduler, jobs)
    finally:
        stop.set()
        runner.join()
    assert sum(engine.sizes) == sum(n * len(sig) for _, n, sig in specs)
    for job, (seed, n, sig) in zip(jobs, specs, strict=True):
        assert job.error is None
        torch.testing.assert_close(job.result, alone(seed, n, sig), rtol=0, atol=0)


def test_without_pipelining_the_engine_thread_waits_for_each_batch_of_an_asynchronous_device() -> None:
    """CM_PIPELINE=false: the A/B of the finishing thread; a full batch waits for the one before to be done."""
    engine = FakeEngine(asynchronous=True)
    scheduler = Scheduler(max_batch=2, max_wait_s=0.0, max_queue=100, pipeline=False)
    scheduler.add_model("m", engine)
    done = Finished()
    jobs = [make_job(seed, 2, ONE, on_done=done) for seed in (1, 2)]
    scheduler.start()
    try:
        for job in jobs:
            scheduler.submit(job)
        wait_until(lambda: len(engine.calls) == 1, "the first batch was not launched")
        time.sleep(0.05)
        assert len(engine.calls) == 1 and not done.jobs  # the engine thread waits for the device
        engine.done(1)
        wait_until(lambda: len(engine.calls) == 2 and done.jobs == jobs[:1], "the first batch did not finish")
        engine.done(1)
        wait_until(lambda: done.jobs == jobs, "the second batch did not finish")
    finally:
        scheduler.stop()
    assert scheduler._devices[0].finisher is None


def test_stop_finishes_the_batches_in_flight() -> None:
    engine = FakeEngine(asynchronous=True)
    scheduler = scheduler_for(engine, max_batch=1)
    done = Finished()
    launched = make_job(1, 1, ONE, on_done=done)
    scheduler.start()
    scheduler.submit(launched)
    wait_until(lambda: len(engine.calls) == 1, "the batch was not launched")
    threading.Timer(0.1, engine.done).start()
    scheduler.stop()
    assert done.jobs == [launched] and launched.error is None  # answered before stop returned


def test_a_device_fault_reported_at_the_fence_fails_that_batch_and_the_server_keeps_serving() -> None:
    engine = FakeEngine(asynchronous=True)
    faults = iter([True])

    def fence() -> Any:
        if next(faults, False):
            def fault() -> None:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return fault
        return lambda: None

    engine.fence = fence  # type: ignore[method-assign]
    scheduler = scheduler_for(engine, max_batch=2)
    finished = threading.Semaphore(0)
    first = make_job(1, 2, TWO, on_done=lambda _: finished.release())
    later = make_job(2, 1, ONE, on_done=lambda _: finished.release())
    scheduler.start()
    try:
        scheduler.submit(first)
        assert finished.acquire(timeout=30)
        scheduler.submit(later)
        assert finished.acquire(timeout=30)
    finally:
        scheduler.stop()
    assert isinstance(first.error, EngineFailure) and scheduler.queue_depth() == 0  # its later step dropped
    assert later.error is None


def test_jobs_submitted_during_an_evaluation_are_prepared_before_the_device_is_free() -> None:
    """The preparing thread draws their noise while the device evaluates, for the jobs within PREPARE_AHEAD
    batches of the queue's front; the others are prepared by the engine thread as before, and every image is the
    same either way."""
    engine, entered, release = held_first_evaluation()
    scheduler = scheduler_for(engine, max_batch=4)
    finished = threading.Semaphore(0)
    first = make_job(0, 1, TWO, on_done=lambda _: finished.release())
    waiting = [make_job(seed, 2, TWO, on_done=lambda _: finished.release()) for seed in range(10, 70, 10)]
    scheduler.start()
    try:
        scheduler.submit(first)
        assert entered.wait(30)
        for job in waiting:
            scheduler.submit(job)
        ahead = waiting[: PREPARE_AHEAD * 4 // 2]  # 2 images each; the queue was empty (the first is evaluated)
        deadline = time.monotonic() + 10
        while not all(job.prepared for job in ahead):
            assert time.monotonic() < deadline, "not prepared while the device evaluated"
            time.sleep(0.001)
        time.sleep(0.05)
        assert not any(job.prepared for job in waiting[len(ahead):])  # beyond the bound: the engine's to prepare
        release.set()
        for _ in range(1 + len(waiting)):
            assert finished.acquire(timeout=30)
    finally:
        scheduler.stop()
    for job in waiting:
        alone = scheduler_for(FakeEngine())
        again = make_job(job.seed, 2, TWO)
        alone.submit(again)
        drain(alone)
        assert job.error is None and np.array_equal(job.images, again.images)


def engine_cycle(scheduler: Scheduler) -> threading.Thread:
    """One collect → run cycle on a thread of its own, as the engine thread runs it (a daemon: a wait that
    never ends cannot hang pytest)."""
    runner = threading.Thread(target=scheduler.run_once, daemon=True)
    runner.start()
    return runner


def ends(runner: threading.Thread) -> bool:
    runner.join(30)
    return not runner.is_alive()


def asleep(scheduler: Scheduler) -> bool:
    """Wait until the engine sleeps on a batch it waits for; whether it does."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with scheduler._cond:
            if scheduler._waiting is not None and scheduler._waiting.lane is not None:
                return True
        time.sleep(0.001)
    return False


def count_wakeups(scheduler: Scheduler) -> list[int]:
    """The queue depth at each wake-up a submission gives the engine."""
    notified: list[int] = []
    real_notify = scheduler._cond.notify
    scheduler._cond.notify = lambda n=1: (notified.append(scheduler.queue_depth()), real_notify(n))  # type: ignore
    return notified


def waiting_scheduler(clock: FakeClock, max_batch: int = 8, max_wait_s: float = 30.0,
                      ) -> tuple[Scheduler, FakeEngine]:
    """max_wait 30 s on a fake clock that moves only when the test moves it; each evaluation takes 100 ms."""
    engine = FakeEngine()
    engine.during = lambda: setattr(clock, "now", clock.now + 0.1)
    scheduler = Scheduler(max_batch=max_batch, max_wait_s=max_wait_s, max_queue=100, clock=clock)
    scheduler.add_model("m", engine)
    return scheduler, engine


def arrive(scheduler: Scheduler, clock: FakeClock, seeds: range | tuple[int, ...], gap: float = 0.0001,
           name: str = "m") -> None:
    for seed in seeds:
        clock.now += gap
        scheduler.submit(make_job(seed, 1, ONE, name=name))


def test_waits_for_a_fuller_batch_while_requests_keep_arriving() -> None:
    clock = FakeClock()
    scheduler, engine = waiting_scheduler(clock, max_batch=3)
    arrive(scheduler, clock, (1, 2), gap=0.001)  # 1 ms apart: worth waiting for more
    runner = engine_cycle(scheduler)
    clock.now += 0.002  # less than 3 gaps of 1 ms: the wait goes on
    scheduler.submit(make_job(3, 1, ONE))  # completes the batch and ends the wait
    assert ends(runner)
    assert engine.sizes == [3]


def test_stops_waiting_when_requests_stop_arriving() -> None:
    """A burst of closed-loop clients arrived together and nothing follows: run it, do not wait out max_wait."""
    clock = FakeClock()
    scheduler, engine = waiting_scheduler(clock)
    arrive(scheduler, clock, range(4), gap=0.0002)
    clock.now += 3 * 0.0002  # then quiet for 3 of those gaps (the fake clock never reaches max_wait's 30 s)
    assert ends(engine_cycle(scheduler))
    assert engine.sizes == [4]


def test_a_short_wait_is_renewed_by_each_arrival() -> None:
    """The quiet time counts from the latest arrival, so a steady stream is waited for up to max_wait."""
    clock = FakeClock()
    scheduler, engine = waiting_scheduler(clock, max_batch=6)
    arrive(scheduler, clock, (0, 1))  # gaps of 0.1 ms: the quiet time is its 0.25 ms floor
    runner = engine_cycle(scheduler)
    arrive(scheduler, clock, range(2, 6), gap=0.0002)  # each arrival within the quiet time of the one before
    assert ends(runner)
    assert engine.sizes == [6]


def test_while_answered_clients_come_back_the_quiet_time_is_a_tenth_of_an_evaluation() -> None:
    """Four clients were answered by a 100 ms evaluation: while one of them is still to come back, a 1 ms pause
    in their 0.1 ms stream does not cut the batch short; 10 ms does."""
    clock = FakeClock()
    scheduler, engine = waiting_scheduler(clock)
    arrive(scheduler, clock, range(4))
    assert drain(scheduler) == 1  # answers four clients; then the device idles
    arrive(scheduler, clock, (4, 5, 6))  # three of them send again
    clock.now += 0.001  # 10 gaps, but a hundredth of an evaluation
    runner = engine_cycle(scheduler)
    assert asleep(scheduler) and engine.sizes == [4]
    clock.now += 0.011  # now quiet for more than a tenth of an evaluation
    with scheduler._cond:
        scheduler._cond.notify()  # the engine thread wakes (as at the end of a timed wait) and sees it
    assert ends(runner)
    assert engine.sizes == [4, 3]


def test_once_the_answered_clients_are_back_the_short_quiet_time_ends_the_wait() -> None:
    clock = FakeClock()
    scheduler, engine = waiting_scheduler(clock)
    arrive(scheduler, clock, range(4))
    assert drain(scheduler) == 1
    notified = count_wakeups(scheduler)
    arrive(scheduler, clock, range(4, 8))  # all four send again
    clock.now += 0.0004  # quiet for 3 of the latest gaps, far less than a tenth of an evaluation
    assert ends(engine_cycle(scheduler))
    assert engine.sizes == [4, 4] and notified == []


def after_a_first_evaluation(clock: FakeClock, answered: int = 2, waiting: int = 2, name: str = "m",
                             max_wait_s: float = 30.0) -> tuple[Scheduler, dict[str, FakeEngine]]:
    """`answered` clients were evaluated (100 ms) and are being answered; `waiting` others of model `name` arrived
    during that evaluation and wait."""
    scheduler, engine = waiting_scheduler(clock, max_wait_s=max_wait_s)
    engines = {"m": engine}
    if name != "m":
        engines[name] = FakeEngine()
        engines[name].during = engine.during
        scheduler.add_model(name, engines[name])
    arrive(scheduler, clock, range(answered), name=name)
    first, evaluate = engines[name], engines[name].during
    first.during = lambda: (evaluate(), arrive(scheduler, clock, range(100, 100 + waiting), gap=0.0),
                            setattr(first, "during", evaluate))
    assert scheduler.run_once(block=False)
    assert scheduler.queue_depth() == waiting
    return scheduler, engines


def test_after_an_evaluation_the_engine_waits_for_the_answered_clients_to_send_again() -> None:
    """Two groups of closed-loop clients would otherwise take turns for good, each group's batch running while
    the other group is answered: the engine waits for the answered ones and runs all four together; only the
    arrival of the last of them wakes it."""
    clock = FakeClock()
    scheduler, engines = after_a_first_evaluation(clock)
    notified = count_wakeups(scheduler)
    runner = engine_cycle(scheduler)
    assert asleep(scheduler) and engines["m"].sizes == [2]  # A and B are still on their way back
    arrive(scheduler, clock, (4, 5))  # A's and B's next requests: the second brings the last of them back
    assert ends(runner)
    assert engines["m"].sizes == [2, 4] and notified == [4]


def test_the_wait_for_answered_clients_lasts_at_most_an_evaluation() -> None:
    """Clients that do not come back (each request its own client) delay the next batch by an evaluation at most."""
    clock = FakeClock()
    scheduler, engines = after_a_first_evaluation(clock, max_wait_s=0.002)
    runner = engine_cycle(scheduler)
    assert asleep(scheduler)
    clock.now += 0.1001  # an evaluation's time (more than max_wait)
    assert ends(runner)
    assert engines["m"].sizes == [2, 2]


def test_no_wait_after_an_evaluation_that_answered_fewer_than_wait() -> None:
    clock = FakeClock()
    scheduler, engines = after_a_first_evaluation(clock, answered=1, waiting=2)
    assert ends(engine_cycle(scheduler))  # runs at once: the fake clock never moves, so a wait would not end
    assert engines["m"].sizes == [1, 2]


def test_clients_that_have_been_coming_back_are_waited_for_even_behind_more_waiting_images() -> None:
    """A closed pool of clients in a 1/4-step mix: A was answered while B's and C's images wait (continuing ones,
    in the mix). Since answered clients have been coming back, the engine waits for A rather than run B and C at
    once and leave A's next request a whole evaluation behind."""
    clock = FakeClock()
    scheduler, engines = after_a_first_evaluation(clock, answered=1, waiting=2)
    scheduler._devices[0].arrivals.came_back = COMING_BACK
    runner = engine_cycle(scheduler)
    assert asleep(scheduler) and engines["m"].sizes == [1]
    arrive(scheduler, clock, (7,))  # A's next request
    assert ends(runner)
    assert engines["m"].sizes == [1, 3]


def test_the_share_of_answered_clients_that_come_back_is_a_running_mean_over_evaluations() -> None:
    """A closed pool (every answered client sends again before the next evaluation ends) reaches COMING_BACK
    within a few evaluations; open-loop traffic, where a quarter as many requests come in, never does."""
    model, other = object(), object()

    def share_after(evaluations: int, back: int) -> float:
        arrivals = Arrivals()
        for _ in range(evaluations):
            arrivals.evaluated(model, 4)  # type: ignore[arg-type]  # answered four images
            for _ in range(back):
                arrivals.arrive(model, 1, 0.0)  # type: ignore[arg-type]
        return arrivals.came_back

    assert share_after(2, 4) == pytest.approx(CAME_BACK_WEIGHT)  # the first evaluation has none before it
    assert share_after(10, 4) >= COMING_BACK
    assert share_after(100, 1) == pytest.approx(0.25)
    assert share_after(2, 9) == pytest.approx(CAME_BACK_WEIGHT)  # more submissions than answered count as all
    arrivals = Arrivals()
    arrivals.evaluated(model, 4)  # type: ignore[arg-type]
    arrivals.evaluated(other, 4)  # type: ignore[arg-type]  # another model's evaluation in between: no share
    assert arrivals.came_back == 0.0


def test_no_wait_after_an_evaluation_for_clients_of_another_model() -> None:
    """Clients A and B of model "other" are being answered; C and D of model "m" wait: they run at once."""
    clock = FakeClock()
    scheduler, engines = after_a_first_evaluation(clock, name="other")
    assert ends(engine_cycle(scheduler))  # the fake clock never moves: a wait would not end
    assert engines["m"].sizes == [2] and engines["other"].sizes == [2]


def test_arrivals_do_not_wake_the_engine_until_the_fuller_batch_is_full() -> None:
    """Each wake-up costs a system call and a GIL hand-off with the event loop: during the wait, only a full
    batch wakes the engine early (the quiet time and max_wait end the wait on their own)."""
    clock = FakeClock()
    scheduler, engine = waiting_scheduler(clock, max_batch=6)
    notified = count_wakeups(scheduler)
    arrive(scheduler, clock, (0, 1))
    runner = engine_cycle(scheduler)
    assert asleep(scheduler)
    arrive(scheduler, clock, range(2, 6), gap=0.0)  # no time passes: the wait goes on
    assert ends(runner)
    assert engine.sizes == [6]
    assert notified == [6]  # one wake-up, by the arrival that filled the batch


# ---------------------------------------------------------------------- editing and interpolation (CM Algorithm 4)


def edit_job(projection: Projection, seed: int, n: int, sigmas: list[float]) -> Job:
    return Job("m", list(sigmas), seed, n, None, 1e12, Finished(), task="inpaint", projection=projection,
               start=projection.start)


def lower_half(shape: tuple[int, ...], seed: int = 0) -> Projection:
    c, h, w = shape
    y = torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    mask = torch.zeros(h, w)
    mask[h // 2 :] = 1
    return inpainting(y, mask)


def test_an_edit_alone_is_exactly_models_sampling_with_the_projection(tiny_model: ConsistencyModel) -> None:
    projection = lower_half(tiny_model.cfg.image_shape)
    scheduler = scheduler_for(Engine(tiny_model))
    job = edit_job(projection, 11, 3, FOUR)
    scheduler.submit(job)
    assert drain(scheduler) == 4
    expected = sample(tiny_model, [11, 12, 13], FOUR, projection=projection, start=projection.start)
    assert torch.equal(job.result, expected)  # bit for bit
    h = tiny_model.cfg.image_size // 2
    assert torch.equal(job.result[:, :, :h], projection.start.expand(3, -1, -1, -1)[:, :, :h])  # known pixels


def test_edits_and_generations_share_evaluations_and_each_is_the_same_as_alone(tiny_model: ConsistencyModel) -> None:
    engine = RecordingEngine(tiny_model)
    scheduler = scheduler_for(engine, max_batch=5)  # runs split across evaluations
    projection = lower_half(tiny_model.cfg.image_shape, seed=3)
    edits = [edit_job(projection, 5, 3, FOUR), edit_job(projection, 50, 2, TWO)]
    generations = [make_job(7, 3, FOUR), make_job(70, 1, ONE)]
    for job in (edits[0], generations[0], edits[1], generations[1]):
        scheduler.submit(job)
    drain(scheduler)
    # the first evaluation holds the 1-step generation, the 2-step edit and two 4-step edit images: one queue
    assert engine.sizes[0] == 5 and sum(engine.sizes) == 3 * 4 + 2 * 2 + 3 * 4 + 1
    for job in edits:
        seeds = [job.seed + i for i in range(job.n)]
        expected = sample(tiny_model, seeds, job.sigmas, projection=projection, start=projection.start)
        np.testing.assert_array_equal(to_uint8(job.result), to_uint8(expected))
    for job in generations:
        expected = reference(tiny_model, job.seed, job.n, job.sigmas)
        np.testing.assert_array_equal(to_uint8(job.result), to_uint8(expected))


def test_denoising_is_one_evaluation_of_the_input_itself() -> None:
    y = torch.full((1, *FakeEngine.image_shape), 0.5)
    scheduler = scheduler_for(FakeEngine())
    job = Job("m", [2.0], 1, 2, None, 1e12, task="denoise", start=y, noised_start=False)
    scheduler.submit(job)
    assert drain(scheduler) == 1
    assert torch.equal(job.result, (y / 3).expand(2, -1, -1, -1))  # f(y, σ) = y / (1 + σ)


def test_interpolation_ends_are_the_seeds_own_images_alone_or_in_a_batch() -> None:
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch=3)
    strip = Job("m", list(TWO), 8, 4, None, 1e12, task="interpolate", interpolation=(9, [0.0, 0.3, 0.7, 1.0]))
    middle = Job("m", list(TWO), 8, 1, None, 1e12, task="interpolate", interpolation=(9, [0.3]))
    scheduler.submit(strip)
    scheduler.submit(make_job(1, 2, FOUR))
    scheduler.submit(middle)
    drain(scheduler)
    assert torch.equal(strip.result[0], alone(8, 1, TWO)[0])  # α = 0: seed a's image
    assert torch.equal(strip.result[1], middle.result[0])  # an image is the same alone or in a batch
    assert strip.labels == [strip.labels[0]] * 4  # every point takes seed a's class label
