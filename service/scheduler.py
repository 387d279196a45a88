"""Per-evaluation scheduling: a queue of images, batched one network evaluation at a time.

A request becomes a `Job` of n images; each image carries its σ schedule, its own seeded noise and its
current step. Queue entries are `Run`s, consecutive images of one job at the same step, so that
bookkeeping costs one Python object per request rather than per image. Each model has a `Lane`: its queue
and its engines, one per device (CM_DEVICES). Each device has one engine thread, and each loops:

  collect  pick the next model with images waiting (round robin); wait as long as `batching.batch_wait`
           says (the one rule of when a batch runs); take up to max_batch images from the front of its queue
           (any request, any step), dropping those of expired or cancelled requests before they cost compute
  run      build each image's step input (CM Algorithm 1, models.sampling) and evaluate the batch once; an edit's
           images (CM Algorithm 4) then go through their job's projection (models.editing), the one difference
  requeue  images with steps left go back to the FRONT of the queue, in order
  complete once the device is done: finished images' pixels go to their requests; a request whose last image
           finished (or that failed) gets its `on_done` callback

One more thread prepares ahead: while a device evaluates, it draws the noise (and decodes an edit's image) of the
jobs submitted meanwhile, so the next batch's host work overlaps the device's; an engine thread prepares any job
it reaches first. The estimates stay on the device between steps (only finished images come back, as uint8).

An asynchronous device (a GPU: `evaluate` returns before the work is done) splits the cycle in two: the engine
thread launches the batch, requeues its unfinished images at once (the device's queue orders their next step
after this one) and goes on; the device's finishing thread waits for the batch and completes its requests. The
engine thread launches the next batch at once when it is full (at most MAX_IN_FLIGHT on the device), else once
the batch in flight is done, and then by `batch_wait` as before.

With several devices the threads share the queues and the lock: whichever is free takes the next batch, each
waits by `batch_wait` on its own view (was it idle, which clients did its latest evaluation answer), and a
submission wakes the threads that may now run and one idle thread. An image's noise comes from its seed whichever
thread draws it, and the engines hold copies of the same network, so a seed gives the same image on every device.

The queue's order (CM_SCHEDULE):
  shortest (default)  images wait in classes by evaluations left; a batch takes the class with the fewest
                      first, so a new 1-step image goes before a 4-step image with 2 or more to go. Within
                      a class a requeued image goes to the front (started work finishes first). An image
                      whose request arrived more than STARVATION_EVALUATIONS evaluations' time ago is taken
                      before any class, oldest first, so longer requests are delayed under saturation, not
                      starved.
  started             one queue: requeued images in front of everything new (the literal "back to the
                      front"). Under saturation a new 1-step request then waits for every started
                      multistep image, so its latency in a 1/4-step mix grows with the 4-step traffic.

No web framework here: the API layer turns the domain errors into HTTP and the callback into a future.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from models.editing import Projection, project_rows
from models.sampling import image_class_label, image_noise, interpolation_noise, noise_scales, renoise, uint8_images

from .batching import batch_wait
from .engine import Evaluation
from .errors import DeadlineExceeded, EngineFailure, NotReady, OutOfMemory, QueueFull, ServiceError

logger = logging.getLogger("cmserve.scheduler")

MAX_RETRY_AFTER_S = 60
SCHEDULE_CACHE = 256  # distinct σ schedules remembered per model
PREPARE_AHEAD = 2  # jobs submitted within this many batches of the queue's front are prepared ahead (memory bound)
MAX_IN_FLIGHT = 2  # batches queued on an asynchronous device at once: the one it runs and the next
SCHEDULES = ("shortest", "started")  # queue orders (module docstring)
STARVATION_EVALUATIONS = 10  # "shortest": a request older than this many evaluations' time goes first
CAME_BACK_WEIGHT = 0.25  # weight of an evaluation's share in the running mean of answered clients coming back


class EngineLike(Protocol):
    """What the scheduler needs of a model's engine (service.engine.Engine; tests use a small fake)."""

    @property
    def image_shape(self) -> tuple[int, int, int]: ...  # (C, H, W)

    @property
    def num_classes(self) -> int: ...  # 0: unconditional

    @property
    def sigma_min(self) -> float: ...

    @property
    def asynchronous(self) -> bool: ...  # evaluate returns before the device is done (a GPU)

    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Evaluation:
        """f(x, σ) clamped to [-1, 1] on the device for a batch (B, C, H, W), σ (B,), labels (B,) or None."""
        ...

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device."""
        ...

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A device tensor's copy in host memory, valid once `fence`'s wait returns."""
        ...

    def fence(self) -> Callable[[], None]:
        """What waits until the device has done everything queued on it so far."""
        ...


TASKS = ("generate", "interpolate", "inpaint", "superres", "colorize", "denoise")  # what a job does (metric label)


@dataclass(eq=False)
class Job:
    """One request: n images with one σ schedule; image i draws all its noise (and its class label when none
    is given) from its own seed + i, so it is the same image whatever else shares its batches.

    An edit (CM Algorithm 4) is the same sampling from `start` (what is known of the image, x_T = start + σ_1·z_1)
    with `projection` applied to every estimate; an interpolation draws image i's x_T as the slerp of two seeds'.
    """

    model: str
    sigmas: list[float]  # the schedule σ_1 > … > σ_steps
    seed: int
    n: int
    class_label: int | None  # None: each image draws its own (conditional models)
    deadline: float  # monotonic seconds; past it the request's remaining images are dropped
    on_done: Callable[[Job], None] = lambda job: None  # called once, from the engine thread or a canceller
    task: str = "generate"  # one of TASKS
    projection: Projection | None = None  # editing: applied to each evaluation's estimates of the job's images
    start: torch.Tensor | None = None  # (1, C, H, W) the estimate before the first step (host memory); None: zeros
    noised_start: bool = True  # False: `start` is x_T itself, not re-noised (denoising: one f(y, σ))
    # makes (projection, start) in prepare: api/edit.py's Edit, data that can cross to an engine process
    edit: Callable[[], tuple[Projection | None, torch.Tensor]] | None = None
    interpolation: tuple[int, list[float]] | None = None  # (seed b, α_i): image i's x_T is slerp(seed's, b's, α_i)
    # Made by the engine thread before the job's first evaluation (no torch work on the event loop).
    noise: torch.Tensor = field(init=False, repr=False)  # (n, steps, C, H, W) float32: image i's z_1 … z_steps
    step_noise: tuple[torch.Tensor, ...] = field(init=False, repr=False)  # noise[:, j] for each step j (views)
    labels: list[int] | None = field(init=False, default=None, repr=False)  # image i's class label
    # (n, C, H, W) current estimates, on the device that made them; None before the first evaluation
    x: torch.Tensor | None = field(init=False, default=None, repr=False)
    sigma32: list[float] = field(init=False, repr=False)  # σ per step, rounded to float32
    scales: list[float] = field(init=False, repr=False)  # noise scale per step (noise_scales)
    images: np.ndarray = field(init=False, repr=False)  # (n, H, W, C) uint8, filled as images finish
    prepared: bool = field(init=False, default=False)
    # Bookkeeping.
    remaining: int = field(init=False)  # images not yet finished
    error: ServiceError | None = field(init=False, default=None)
    finished: bool = field(init=False, default=False)
    submitted_at: float = field(init=False, default=0.0)
    started_at: float | None = field(init=False, default=None)  # first evaluation that held one of its images
    finished_at: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.remaining = self.n

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    @property
    def result(self) -> torch.Tensor:
        """(n, C, H, W) images in [-1, 1] on the device, once the job finished without error."""
        assert self.x is not None, "the job has not been evaluated"
        return self.x

    @property
    def class_labels(self) -> list[int | None]:
        """Each image's class label (None for unconditional models); known once the job has started."""
        return [None] * self.n if self.labels is None else list(self.labels)

    def prepare(self, engine: EngineLike, schedule: tuple[list[float], list[float]],
                generator: torch.Generator | None = None) -> None:
        """Draw every image's noise and label from its seed, and build an edit's projection and start; runs on the
        engine thread (`generator`: a CPU generator of that thread's to reseed for each draw, rather than one made
        per draw)."""
        shape, num_classes, seed = engine.image_shape, engine.num_classes, self.seed
        if self.edit is not None:
            self.projection, self.start = self.edit()
        if self.interpolation is not None:  # every image is seed's but for x_T, and takes seed's class label
            self.noise = interpolation_noise((seed, self.interpolation[0]), self.interpolation[1], shape, self.steps,
                                             generator)
        elif self.n == 1:  # most requests: a view rather than a stack of one
            self.noise = image_noise(seed, shape, self.steps, generator).unsqueeze(0)
        else:
            self.noise = torch.stack([image_noise(seed + i, shape, self.steps, generator) for i in range(self.n)])
        self.step_noise = self.noise.unbind(1)  # a batch takes its images' step noise without indexing ops
        if num_classes:
            seeds = [seed] * self.n if self.interpolation is not None else range(seed, seed + self.n)
            self.labels = [self.class_label] * self.n if self.class_label is not None else [
                image_class_label(s, num_classes, generator) for s in seeds]
        self.sigma32, self.scales = schedule
        if not self.noised_start:
            self.scales = [0.0, *self.scales[1:]]
        self.images = np.empty((self.n, shape[1], shape[2], shape[0]), dtype=np.uint8)
        self.prepared = True


@dataclass(slots=True)
class Run:
    """Images start … stop-1 of one job, all about to take step `step` (0-based)."""

    job: Job
    start: int
    stop: int
    step: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def evaluations_left(self) -> int:
        return self.size * (self.job.steps - self.step)

    @property
    def steps_left(self) -> int:
        return self.job.steps - self.step


class SchedulerObserver:
    """Hooks the scheduler calls (from the engine threads); the default does nothing. Metrics subclass it."""

    def on_evaluation(self, model: str, batch_size: int, seconds: float) -> None:
        """One network evaluation of `batch_size` images took `seconds`."""

    def on_device_evaluation(self, model: str, device: str, batch_size: int, seconds: float) -> None:
        """The same evaluation, with the label of the device that ran it."""

    def on_queue_wait(self, model: str, seconds: float) -> None:
        """A job's first image reached the device `seconds` after the job was submitted."""

    def on_images_finished(self, model: str, count: int, task: str) -> None:
        """`count` images of jobs doing `task` took their last step."""


@dataclass
class Lane:
    """One model's queue and engines (one per device). The queue is a deque per class (evaluations left, or one
    class for the "started" order). Only its push and pop methods change it, and they keep its two counts."""

    name: str
    engines: list[EngineLike]  # by device index; copies of one network
    by_steps_left: bool = True  # the "shortest" order: one class per number of evaluations left
    classes: dict[int, deque[Run]] = field(default_factory=dict)
    queued: int = 0  # images in the queue
    evaluations: int = 0  # image-evaluations the queued images still need
    schedules: dict[tuple[float, ...], tuple[list[float], list[float]]] = field(default_factory=dict)

    @property
    def engine(self) -> EngineLike:
        """The first device's engine: what every copy shares (shapes, classes, σ range)."""
        return self.engines[0]

    def _class(self, run: Run) -> deque[Run]:
        key = run.steps_left if self.by_steps_left else 0
        found = self.classes.get(key)
        if found is None:
            found = self.classes[key] = deque()
            self.classes = dict(sorted(self.classes.items()))  # fewest evaluations left first
        return found

    def _count(self, run: Run, sign: int) -> None:
        self.queued += sign * run.size
        self.evaluations += sign * run.evaluations_left

    def push_back(self, run: Run) -> None:
        self._class(run).append(run)
        self._count(run, 1)

    def push_front(self, run: Run) -> None:
        self._class(run).appendleft(run)
        self._count(run, 1)

    def pop(self, now: float, starve_s: float) -> Run | None:
        """The next run: the front of the first class, unless the request of another class's front arrived more
        than `starve_s` ago (then the oldest such): once old, a request keeps going first until it is done."""
        heads = [q for q in self.classes.values() if q]
        if not heads:
            return None
        queue = heads[0]
        if len(heads) > 1:
            oldest = min(heads, key=lambda q: q[0].job.submitted_at)
            if now - oldest[0].job.submitted_at > starve_s:
                queue = oldest
        run = queue.popleft()
        self._count(run, -1)
        return run

    def runs(self) -> list[Run]:
        return [run for queue in self.classes.values() for run in queue]

    def remove(self, job: Job) -> None:
        """Take every queued run of `job` out."""
        for key, queue in self.classes.items():
            mine = [run for run in queue if run.job is job]
            if mine:
                self.classes[key] = deque(run for run in queue if run.job is not job)
                for run in mine:
                    self._count(run, -1)

    def schedule(self, sigmas: list[float]) -> tuple[list[float], list[float]]:
        """(σ per step in float32, noise scale per step) for a schedule, remembered."""
        key = tuple(sigmas)
        found = self.schedules.get(key)
        if found is None:
            if len(self.schedules) >= SCHEDULE_CACHE:
                self.schedules.clear()
            sigma32 = torch.tensor(sigmas, dtype=torch.float32).tolist()
            found = self.schedules[key] = (sigma32, noise_scales(sigmas, self.engine.sigma_min))
        return found


@dataclass
class Arrivals:
    """What the scheduler knows of the images coming in: the inputs of `batch_wait` that submissions change."""

    last: float = -math.inf  # when the latest job was submitted
    gap: float = math.inf  # seconds between the two latest submissions
    lane: Lane | None = None  # the model of the latest evaluation
    answered: int = 0  # images of the jobs that evaluation ended: their clients may send again
    returned: int = 0  # images submitted to that model since
    came_back: float = 0.0  # running mean of min(1, returned / answered) at the next evaluation of the same model

    def arrive(self, lane: Lane, n: int, now: float) -> bool:
        """Count a submission of n images; True when it brings back the last of the images answered."""
        self.gap, self.last = now - self.last, now
        if lane is not self.lane:
            return False
        self.returned += n
        return self.returned - n < self.answered <= self.returned

    def evaluated(self, lane: Lane, answered: int) -> None:
        if lane is self.lane and self.answered:  # how many of the evaluation before's clients came back since
            self.came_back += CAME_BACK_WEIGHT * (min(1.0, self.returned / self.answered) - self.came_back)
        self.lane, self.answered, self.returned = lane, answered, 0

    def of(self, lane: Lane) -> tuple[int, int]:
        """(answered, returned) for a lane: zeros unless the latest evaluation was its own."""
        return (self.answered, self.returned) if lane is self.lane else (0, 0)


@dataclass(slots=True)
class Waiting:
    """An engine thread asleep on its condition: for any work (lane None), for a lane's batch since `since`, or
    (held) for its device to finish a batch in flight, unless a full batch is queued first."""

    lane: Lane | None
    since: float
    held: bool = False


@dataclass(eq=False)
class Device:
    """One engine thread: its engine's index in every lane, and the state its `batch_wait` reads."""

    index: int
    label: str  # the metrics' device label
    wake: threading.Condition  # on the scheduler's lock: a submission wakes this thread alone
    arrivals: Arrivals = field(default_factory=Arrivals)
    idle: bool = True  # the thread found no work at its latest look
    waiting: Waiting | None = None  # set while the thread sleeps on `wake`
    generator: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))  # reseeded per draw
    thread: threading.Thread | None = None
    # An asynchronous device's batches in flight, and the thread that finishes them (see _finishing).
    in_flight: int = 0  # under the scheduler's lock
    launched: deque[Launched] = field(default_factory=deque)
    handoff: threading.Condition = field(default_factory=threading.Condition)  # guards `launched`, `closing`
    finisher: threading.Thread | None = None
    closing: bool = False
    last_ready: float = -math.inf  # when its latest batch was done


@dataclass(eq=False)
class Launched:
    """A batch queued on a device, and what finishing it needs once the device is done."""

    lane: Lane
    runs: list[Run]
    pixels: torch.Tensor | None  # (B, H, W, C) uint8 in host memory, valid after `ready`; None: none finishes
    ready: Callable[[], None]  # waits for the device (EngineLike.fence)
    started: float

    @property
    def size(self) -> int:
        return sum(run.size for run in self.runs)


class Scheduler:
    """The queue of images of every served model and the threads that feed the devices, one per device."""

    def __init__(
        self,
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        observer: SchedulerObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        schedule: str = "shortest",
        devices: Sequence[str] = ("0",),  # a label per device; each model then has one engine per device
        pipeline: bool = True,  # an asynchronous device's batches finished on a thread of their own (see above)
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.observer = observer or SchedulerObserver()
        self.clock = clock
        self.evaluations = 0  # network evaluations run
        self.images_evaluated = 0  # image-evaluations run (sum of batch sizes)
        self._lanes: dict[str, Lane] = {}  # by model name, in round-robin order
        self._next = 0  # index of the lane whose turn is next
        if not devices or len(set(devices)) != len(devices):
            raise ValueError(f"devices must be distinct labels, at least one, got {list(devices)}")
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # held around every change; also the first device's condition
        self._devices = [Device(i, label, self._cond if i == 0 else threading.Condition(lock))
                         for i, label in enumerate(devices)]
        self._jobs_lock = threading.Lock()  # a job's tensors that two devices' threads may both set up
        self._evaluation_s = 0.0  # moving average of one evaluation's duration
        self._stopping = False
        # Jobs the preparing thread draws the noise of while a device evaluates (see _prepare_ahead).
        self._ahead = threading.Condition(threading.Lock())
        self._unprepared: deque[Job] = deque()  # submitted within PREPARE_AHEAD batches of the queue's front
        self._evaluating = 0  # devices in an evaluation now
        self._preparer: threading.Thread | None = None

    # ------------------------------------------------------------------ models and jobs

    @property
    def devices(self) -> list[str]:
        return [device.label for device in self._devices]

    @property
    def _waiting(self) -> Waiting | None:
        """The first device's thread's wait (tests watch it)."""
        return self._devices[0].waiting

    def add_model(self, name: str, *engines: EngineLike) -> None:
        """Schedule a model: one engine per device, in the devices' order."""
        if len(engines) != len(self._devices):
            raise ValueError(f"model {name!r} has {len(engines)} engine(s) for {len(self._devices)} device(s)")
        with self._cond:
            if name in self._lanes:
                raise ValueError(f"model {name!r} is already scheduled")
            self._lanes[name] = Lane(name, list(engines), by_steps_left=self.schedule == "shortest")

    def submit(self, job: Job) -> None:
        """Admit a job at the back of its model's queue, or raise QueueFull at once."""
        lane = self._lanes[job.model]  # the API resolved the name; a KeyError here is a bug
        with self._cond:
            if self._stopping:
                raise NotReady("the server is shutting down")
            queued = self.queue_depth()
            if queued + job.n > self.max_queue:
                raise QueueFull(
                    f"the queue holds {queued} images and admits at most {self.max_queue} "
                    f"(CM_MAX_QUEUE); this request has {job.n}",
                    retry_after_s=self._retry_after_locked(),
                )
            now = self.clock()
            job.submitted_at = now
            lane.push_back(Run(job, 0, job.n, 0))
            self._arrive_locked(lane, job.n, now)
        if self._preparer is not None and queued + job.n <= PREPARE_AHEAD * self.max_batch:  # else the engine's
            with self._ahead:
                self._unprepared.append(job)
                if self._evaluating:
                    self._ahead.notify()

    def _arrive_locked(self, lane: Lane, n: int, now: float) -> None:
        """Count a submission and wake a thread (a system call and a GIL hand-off) only when batch_wait may now
        say "run": its batch is full, or the last client it answered is back after an evaluation; its other turns
        are timed. One idle thread wakes too, even while another fills this lane's batch: with several devices
        the clients then settle into one group per device, each device's batch evaluated while the others'
        clients send again. A thread held by its device's batch in flight wakes only for a full batch."""
        idle = None
        for device in self._devices:
            back = device.arrivals.arrive(lane, n, now)
            waiting = device.waiting
            if waiting is None:
                continue
            if waiting.held:
                if lane.queued >= self.max_batch:
                    device.wake.notify()
            elif waiting.lane is None:
                idle = idle or device
            elif waiting.lane is lane and (lane.queued >= self.max_batch or (back and not device.idle)):
                device.wake.notify()
        if idle is not None:
            idle.wake.notify()

    def _wake_idle_locked(self) -> None:
        """Wake one thread that sleeps for want of work, if any does."""
        for device in self._devices:
            if device.waiting is not None and device.waiting.lane is None and not device.waiting.held:
                device.wake.notify()
                return

    def cancel(self, job: Job, error: ServiceError) -> bool:
        """End a job with `error` and drop its queued images; False if it had already finished."""
        with self._cond:
            if not self._finish_locked(job, error):
                return False
            self._lanes[job.model].remove(job)
        job.on_done(job)
        return True

    def queue_depth(self, model: str | None = None) -> int:
        """Images waiting for an evaluation (not counting those on the device now)."""
        if model is None:
            return sum(lane.queued for lane in self._lanes.values())
        lane = self._lanes.get(model)
        return lane.queued if lane else 0

    # ------------------------------------------------------------------ the engine thread

    def start(self) -> None:
        if self._preparer is None:
            self._preparer = threading.Thread(target=self._prepare_ahead, name="cmserve-prepare", daemon=True)
            self._preparer.start()
        for device in self._devices:
            if device.thread is None:
                name = "cmserve-engine" if len(self._devices) == 1 else f"cmserve-engine-{device.label}"
                device.thread = threading.Thread(target=self._loop, args=(device.index,), name=name, daemon=True)
                device.thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the engine threads after their current evaluations (those in flight are finished); jobs still
        queued fail with NotReady."""
        with self._cond:
            self._stopping = True
            for device in self._devices:
                device.wake.notify_all()
            leftover = [run.job for lane in self._lanes.values() for run in lane.runs()]
        end = None if timeout is None else time.monotonic() + timeout
        for device in self._devices:
            if device.thread is not None:
                device.thread.join(None if end is None else max(0.0, end - time.monotonic()))
        for device in self._devices:  # after the engine threads: no batch is launched any more
            with device.handoff:
                device.closing = True
                device.handoff.notify()
            if device.finisher is not None:
                device.finisher.join(None if end is None else max(0.0, end - time.monotonic()))
        if self._preparer is not None:
            with self._ahead:
                self._ahead.notify()
            self._preparer.join(None if end is None else max(0.0, end - time.monotonic()))
        for job in dict.fromkeys(leftover):
            self.cancel(job, NotReady("the server shut down before this request finished"))

    def _prepare_ahead(self) -> None:
        """Overlap a batch's host work with the device: while an engine thread waits for its device's evaluation,
        this thread prepares the jobs submitted meanwhile (noise, labels, an edit's image and projection), so the
        next batch is ready when the device is free. Only then: while no device evaluates, the engine thread
        prepares its batch itself, and this thread would only compete with the event loop for the GIL. A job is
        prepared once, by whichever thread comes first (under the jobs' lock)."""
        generator = torch.Generator(device="cpu")
        while True:
            with self._ahead:
                while not self._stopping and not (self._evaluating and self._unprepared):
                    self._ahead.wait()
                if self._stopping:
                    return
                job = self._unprepared.popleft()
            if job.prepared or job.finished:
                continue
            lane = self._lanes[job.model]
            with self._jobs_lock:
                if not job.prepared:
                    with contextlib.suppress(Exception):  # the engine thread meets it again and fails it there
                        job.prepare(lane.engine, lane.schedule(job.sigmas), generator)

    def _evaluation(self, started: bool) -> None:
        """Count a device's evaluation in or out, waking the preparing thread when there is work for it."""
        with self._ahead:
            self._evaluating += 1 if started else -1
            if started and self._unprepared:
                self._ahead.notify()

    def _loop(self, device: int) -> None:
        while self.run_once(block=True, device=device):
            pass

    def run_once(self, block: bool = True, device: int = 0) -> bool:
        """One collect → run → requeue → complete cycle on a device's engines; False once stopping (or,
        unblocked, when idle). Blocking, an asynchronous device's batch is completed by the device's finishing
        thread; unblocked, always here."""
        this = self._devices[device]
        picked = self._collect(this, block)
        if picked is None:
            return not self._stopping and block
        lane, runs = picked
        try:
            with torch.no_grad():
                done = self._run(this, lane, runs, pipelined=block)
        except Exception as e:  # a bug or a device fault: fail this batch's requests, keep serving
            logger.exception("network evaluation failed for model %s on device %s", lane.name, this.label)
            done = self._fail_runs(lane, runs, EngineFailure(f"the network evaluation failed ({type(e).__name__})"))
        for job in done:
            job.on_done(job)
        return True

    # collect ------------------------------------------------------------

    def _collect(self, device: Device, block: bool) -> tuple[Lane, list[Run]] | None:
        """The next batch, after answering (outside the lock) the jobs whose deadline passed in the queue."""
        while True:
            expired: list[Job] = []
            try:
                picked = self._collect_locked(device, block, expired)
            finally:
                for job in expired:
                    job.on_done(job)
            if picked is not None or not expired:
                return picked

    def _collect_locked(self, device: Device, block: bool, expired: list[Job]) -> tuple[Lane, list[Run]] | None:
        """A batch, or None when idle or stopping, or when jobs expired and nothing else was left to take (they are
        answered before the thread sleeps)."""
        with self._cond:
            while not self._stopping:
                if self._held_locked(device):
                    self._sleep_locked(device, Waiting(None, self.clock(), held=True), None)
                    continue
                lane = self._next_lane_locked()
                if lane is None:
                    device.idle = True
                    if not block or expired:
                        return None
                    self._sleep_locked(device, Waiting(None, self.clock()), None)
                    continue
                if block:
                    self._wait_for_batch_locked(device, lane)
                device.idle = False
                runs = self._take_locked(lane, expired)
                if runs:
                    if len(self._devices) > 1 and any(other.queued for other in self._lanes.values()):
                        self._wake_idle_locked()  # the rest is the next free device's
                    return lane, runs
            return None

    def _held_locked(self, device: Device) -> bool:
        """Whether the device's next batch waits for its batch in flight to finish: always at MAX_IN_FLIGHT, and
        else unless a full batch is queued (launched early, a partial batch would take fewer of the clients that
        the batch in flight is about to answer; a full one loses nothing and keeps the device busy)."""
        if not device.in_flight:
            return False
        return device.in_flight >= MAX_IN_FLIGHT or all(lane.queued < self.max_batch for lane in self._lanes.values())

    def _next_lane_locked(self) -> Lane | None:
        lanes = list(self._lanes.values())
        for i in range(len(lanes)):
            lane = lanes[(self._next + i) % len(lanes)]
            if lane.queued:
                self._next = (self._next + i + 1) % len(lanes)
                return lane
        return None

    def _wait_for_batch_locked(self, device: Device, lane: Lane) -> None:
        """Sleep until batch_wait says to run the lane's batch, another device took it, or the scheduler stops."""
        waiting = Waiting(lane, self.clock())
        while not self._stopping and lane.queued:
            left = self._wait_left_locked(device, waiting)
            if left <= 0:
                return
            self._sleep_locked(device, waiting, left)

    def _wait_left_locked(self, device: Device, waiting: Waiting) -> float:
        assert waiting.lane is not None
        now, arrivals = self.clock(), device.arrivals
        answered, returned = arrivals.of(waiting.lane)
        return batch_wait(
            queued=waiting.lane.queued, max_batch=self.max_batch, idle=device.idle, answered=answered,
            returned=returned, came_back=arrivals.came_back, gap=arrivals.gap, since_arrival=now - arrivals.last,
            evaluation_s=self._evaluation_s, waited=now - waiting.since, max_wait=self.max_wait_s,
        )

    @staticmethod
    def _sleep_locked(device: Device, waiting: Waiting, timeout: float | None) -> None:
        device.waiting = waiting
        try:
            device.wake.wait(timeout)
        finally:
            device.waiting = None

    def _take_locked(self, lane: Lane, expired: list[Job]) -> list[Run]:
        """Pop up to max_batch images from the lane's front, splitting the last run if needed."""
        runs: list[Run] = []
        count = 0
        now = self.clock()
        starve_s = STARVATION_EVALUATIONS * self._evaluation_s if self.evaluations else math.inf
        while count < self.max_batch:
            run = lane.pop(now, starve_s)
            if run is None:
                break
            job = run.job
            if job.finished:  # cancelled while queued (its runs are normally removed at once)
                continue
            if job.deadline <= now:
                self._finish_locked(job, DeadlineExceeded(_deadline_message(job)))
                lane.remove(job)
                expired.append(job)
                continue
            room = self.max_batch - count
            if run.size > room:  # split: the rest keeps its place at the front
                lane.push_front(Run(job, run.start + room, run.stop, run.step))
                run = Run(job, run.start, run.start + room, run.step)
            runs.append(run)
            count += run.size
        return runs

    # run ----------------------------------------------------------------

    def _run(self, device: Device, lane: Lane, runs: list[Run], pipelined: bool = False) -> list[Job]:
        """Launch the batch's evaluation, store each image's estimate (on the device), requeue unfinished images,
        and finish the batch: here, or on an asynchronous device when `pipelined`, in the device's finishing thread
        while this thread goes on to the next batch. Returns the jobs that ended here."""
        started = self.clock()
        refused: dict[Job, ServiceError] = {}
        for run in runs:
            job = run.job
            if job.started_at is None:
                with self._jobs_lock:  # another device may hold the job's other images
                    if not job.prepared:
                        try:
                            job.prepare(lane.engine, lane.schedule(job.sigmas), device.generator)
                        except ServiceError as e:  # an edit's image that does not decode: that request alone fails
                            refused[job] = e
                            continue
                    first = job.started_at is None
                    if first:
                        job.started_at = started
                if first:
                    self.observer.on_queue_wait(lane.name, started - job.submitted_at)
        if refused:
            ended = self._fail_jobs(lane, refused)
            runs = [run for run in runs if run.job not in refused]
            return ended + (self._run(device, lane, runs, pipelined) if runs else [])
        engine = lane.engines[device.index]
        x, sigma, labels = _batch_inputs(runs, engine)
        self._evaluation(started=True)
        try:
            evaluation = engine.evaluate(x, sigma, labels)
            launched = self._store(lane, runs, evaluation.out, engine, started)
            ended = self._after_launch(lane, runs, evaluation.failed)
        except BaseException:
            self._evaluation(started=False)
            raise
        if pipelined and self.pipeline and engine.asynchronous:
            self._hand_over(device, launched)
            return ended
        return ended + self._finish(device, launched)

    def _store(self, lane: Lane, runs: list[Run], out: torch.Tensor, engine: EngineLike, started: float) -> Launched:
        """Each image's estimate (projected, for an edit) into its job, the finishing images' pixels on their way
        to host memory, and the fence that says when both are done."""
        out = project_rows(out, [(run.job.projection, run.size) for run in runs])
        finishing = any(run.step + 1 == run.job.steps for run in runs)
        pixels = engine.to_host(uint8_images(out)) if finishing else None  # one conversion for the whole batch
        for run, rows in zip(runs, out.split([run.size for run in runs]), strict=True):  # one op for every run
            job = run.job
            if run.size == job.n:  # the whole job: its estimates are these rows of `out` (a new tensor each time)
                job.x = rows
            else:
                with self._jobs_lock:  # another device may be storing the job's other images
                    if job.x is None:  # the other images' estimates: the start, or zeros
                        start = job.start
                        job.x = (torch.zeros(job.n, *out.shape[1:], device=out.device) if start is None
                                 else engine.stage(start).repeat(job.n, 1, 1, 1))
                    elif job.x.is_inference():  # rows of an earlier `out` (the job was whole then): a copy to write in
                        job.x = job.x.clone()
                    job.x[run.start : run.stop] = rows
        return Launched(lane, runs, pixels, engine.fence(), started)

    def _after_launch(self, lane: Lane, runs: list[Run], failed_rows: list[int]) -> list[Job]:
        """Fail the jobs of rows the device had no memory for; requeue the other images with steps left, at once
        (their estimates are on the device, whose queue orders their next evaluation after this one)."""
        failed_jobs = _jobs_of_rows(runs, failed_rows)
        ended: list[Job] = []
        again: list[Run] = []
        with self._cond:
            for job in failed_jobs:
                if self._finish_locked(job, OutOfMemory("the device ran out of memory even for one image")):
                    lane.remove(job)
                    ended.append(job)
            for run in runs:
                job = run.job
                if not job.finished and run.step + 1 < job.steps:  # finished: failed, or cancelled meanwhile
                    again.append(Run(job, run.start, run.stop, run.step + 1))
            for run in reversed(again):  # back to the front (of their class), in their order
                lane.push_front(run)
        return ended

    def _finish(self, device: Device, launched: Launched) -> list[Job]:
        """Once the device is done with a batch: its timing, its finished images' pixels into their jobs, and the
        jobs whose last image that was; returns them."""
        lane, runs = launched.lane, launched.runs
        try:
            launched.ready()
        except Exception as e:  # a device fault reported late: fail the batch's requests, keep serving
            logger.exception("network evaluation failed for model %s on device %s", lane.name, device.label)
            return self._fail_runs(lane, runs, EngineFailure(f"the network evaluation failed ({type(e).__name__})"))
        finally:
            self._evaluation(started=False)
        now = self.clock()
        seconds = now - max(launched.started, device.last_ready)  # queued behind another batch: from its end
        device.last_ready = now
        size = launched.size
        self.observer.on_evaluation(lane.name, size, seconds)
        self.observer.on_device_evaluation(lane.name, device.label, size, seconds)
        self._evaluation_s = seconds if not self.evaluations else 0.9 * self._evaluation_s + 0.1 * seconds
        pixels = None if launched.pixels is None else launched.pixels.numpy()
        ended: list[Job] = []
        finished_images: dict[str, int] = {}  # by task
        with self._cond:
            self.evaluations += 1
            self.images_evaluated += size
            row = 0
            for run in runs:
                job = run.job
                if pixels is not None and run.step + 1 == job.steps and not job.finished:
                    job.images[run.start : run.stop] = pixels[row : row + run.size]
                    finished_images[job.task] = finished_images.get(job.task, 0) + run.size
                    job.remaining -= run.size
                    if job.remaining == 0 and self._finish_locked(job, None):
                        ended.append(job)
                row += run.size
            device.arrivals.evaluated(lane, sum(job.n for job in ended))
        for task, count in finished_images.items():
            self.observer.on_images_finished(lane.name, count, task)
        return ended

    def _hand_over(self, device: Device, launched: Launched) -> None:
        """Queue a launched batch for the device's finishing thread (started at the first)."""
        with self._cond:
            device.in_flight += 1
        with device.handoff:
            device.launched.append(launched)
            device.handoff.notify()
            if device.finisher is None:
                name = "cmserve-finish" if len(self._devices) == 1 else f"cmserve-finish-{device.label}"
                device.finisher = threading.Thread(target=self._finishing, args=(device,), name=name, daemon=True)
                device.finisher.start()

    def _finishing(self, device: Device) -> None:
        """An asynchronous device's finishing thread: waits for each launched batch in order and completes it, while
        the engine thread prepares and launches the next; exits once closing with none left."""
        while True:
            with device.handoff:
                while not device.launched and not device.closing:
                    device.handoff.wait()
                if not device.launched:
                    return
                launched = device.launched.popleft()
            try:
                ended = self._finish(device, launched)
            except Exception as e:  # a bug: fail the batch's requests, keep finishing
                logger.exception("finishing a batch of model %s failed", launched.lane.name)
                error = EngineFailure(f"finishing the batch failed ({type(e).__name__})")
                ended = self._fail_runs(launched.lane, launched.runs, error)
            with self._cond:
                device.in_flight -= 1
                device.wake.notify()  # its engine thread may be held until now
            for job in ended:  # after the wake: the next batch's launch goes first
                job.on_done(job)

    def _fail_runs(self, lane: Lane, runs: list[Run], error: ServiceError) -> list[Job]:
        return self._fail_jobs(lane, dict.fromkeys((run.job for run in runs), error))

    def _fail_jobs(self, lane: Lane, errors: dict[Job, ServiceError]) -> list[Job]:
        ended = []
        with self._cond:
            for job, error in errors.items():
                if self._finish_locked(job, error):
                    lane.remove(job)
                    ended.append(job)
        return ended

    # bookkeeping (hold the lock) -----------------------------------------

    def _finish_locked(self, job: Job, error: ServiceError | None) -> bool:
        if job.finished:
            return False
        job.finished = True
        job.error = error
        job.finished_at = self.clock()
        return True

    def _retry_after_locked(self) -> int:
        """Seconds until the queued work is likely done: its image-evaluations / batch / devices × evaluation time."""
        evaluations = sum(lane.evaluations for lane in self._lanes.values()) / self.max_batch / len(self._devices)
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(evaluations * self._evaluation_s))))


def _batch_inputs(runs: list[Run], engine: EngineLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Step inputs (B, C, H, W) on the engine's device, σ (B,) and labels (B,) for a batch: x + scale·z
    (models.sampling.renoise). The noise term scale·z is made in host memory, where the noise was drawn, and goes
    to the device in one copy; the estimates are there already. The same operations as renoise's, so the same
    bits."""
    if len(runs) == 1:
        run = runs[0]
        job, a, b, j = run.job, run.start, run.stop, run.step
        noise = engine.stage(renoise(None, job.scales[j], _step_noise(run)))  # (B, C, H, W)
        estimates = _estimates(run, engine)
        x = noise if estimates is None else estimates + noise
        sigma = torch.full((b - a,), job.sigma32[j])
        labels = None if job.labels is None else torch.tensor(job.labels[a:b], dtype=torch.long)
        return x, sigma, labels
    scale = torch.tensor([run.job.scales[run.step] for run in runs for _ in range(run.size)])
    sigma = torch.tensor([run.job.sigma32[run.step] for run in runs for _ in range(run.size)])
    z = torch.cat([_step_noise(run) for run in runs])  # (B, C, H, W)
    noise = engine.stage(renoise(None, scale, z))
    # the estimates: at their first step an edit's start, else zeros, and none at all when no image has either
    estimates = [_estimates(run, engine) for run in runs]
    present = [e is not None for e in estimates]
    if all(present):
        x = torch.cat(estimates) + noise  # type: ignore[arg-type]
    elif any(present):  # rows without one keep scale·z; the others get estimate + scale·z, the same bits
        rows, row = [], 0
        for run, e in zip(runs, estimates, strict=True):
            if e is not None:
                rows.extend(range(row, row + run.size))
            row += run.size
        index = engine.stage(torch.tensor(rows))  # staged: a plain copy to a GPU would wait for the batch in flight
        x = noise.index_add_(0, index, torch.cat([e for e in estimates if e is not None]))
    else:
        x = noise
    labels = None
    if runs[0].job.labels is not None:  # one tensor for the batch (a model's jobs are all (un)conditional)
        labels = torch.tensor([label for run in runs for label in run.job.labels[run.start : run.stop]],
                              dtype=torch.long)
    return x, sigma, labels


def _step_noise(run: Run) -> torch.Tensor:
    """(size, C, H, W) the noise of the run's images at its step (a view of the job's noise)."""
    noise = run.job.step_noise[run.step]
    return noise if run.size == run.job.n else noise[run.start : run.stop]


def _estimates(run: Run, engine: EngineLike) -> torch.Tensor | None:
    """The run's images' current estimates on the device: before the first step the job's start (editing), or
    None (zeros)."""
    job = run.job
    if job.x is not None:  # on the device that made them, which with CM_DEVICES may be another
        return engine.stage(job.x if run.size == job.n else job.x[run.start : run.stop])
    start = job.start
    if start is None:
        return None
    start = engine.stage(start)
    return start if run.size == len(start) else start.expand(run.size, *start.shape[1:])  # (B, C, H, W)


def _jobs_of_rows(runs: list[Run], rows: list[int]) -> list[Job]:
    if not rows:
        return []
    jobs: dict[Job, None] = {}
    bounds, edge = [], 0
    for run in runs:
        bounds.append((edge, edge + run.size, run.job))
        edge += run.size
    for row in rows:
        jobs.update({job: None for lo, hi, job in bounds if lo <= row < hi})
    return list(jobs)


def _deadline_message(job: Job) -> str:
    done = job.n - job.remaining
    return f"the request's deadline passed with {job.n - done} of {job.n} images unfinished (CM_REQUEST_TIMEOUT_S)"
