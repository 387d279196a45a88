"""The engine process of CM_FRONTENDS > 1: the models, the one Scheduler and its engine threads, for every front end.

Front ends (service/frontend.py) connect DEALER sockets to this process's ROUTER socket (ipc:// in a private
folder) and send service/wire.py messages. Each Submit becomes a real `Job` on the real Scheduler, so requests
of all front ends share the same per-evaluation batches; a Job's `on_done` (on an engine thread) queues it and
wakes this loop through a pipe, and the loop, the only user of the socket, sends its Result back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from types import FrameType

import msgspec
import torch
import zmq

from . import wire
from .engine import Engine
from .errors import ServiceError
from .scheduler import Job, Scheduler
from .settings import Settings
from .signals import HANDLED_SIGNALS
from .state import ServiceState

logger = logging.getLogger("cmserve.engine")

POLL_MS = 100  # how often the loop looks at its stop flag when nothing arrives


class EngineHost:
    """Turns the front ends' messages into calls on the scheduler and finished jobs into Results."""

    def __init__(self, scheduler: Scheduler, describe: Callable[[], wire.Description], address: str,
                 context: zmq.Context | None = None) -> None:
        self.scheduler = scheduler
        self.describe = describe
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.linger = 0
        self._socket.bind(address)
        self._jobs: dict[tuple[bytes, int], Job] = {}  # (front end, its job id) -> the job on the scheduler
        self._keys: dict[Job, tuple[bytes, int]] = {}
        self._done: queue.SimpleQueue[Job] = queue.SimpleQueue()  # ended jobs, from the engine threads
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Answer messages until `should_stop()`; the caller stops the scheduler after."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not should_stop():
            events = dict(poller.poll(POLL_MS))
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 65536)
                self._send_done()
            if self._socket in events:
                while True:
                    try:
                        frames = self._socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(frames[0], frames[1])

    def close(self) -> None:
        self._socket.close(0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _handle(self, peer: bytes, data: bytes) -> None:
        try:
            message = wire.decode_to_engine(data)
        except msgspec.DecodeError as e:  # a front end of another version, or a bug: its message alone is lost
            logger.error("a front end's message could not be decoded: %s", e)
            return
        if isinstance(message, wire.Describe):
            self._socket.send_multipart([peer, wire.encode(self.describe())])
        elif isinstance(message, wire.Submit):
            self._submit(peer, message)
        else:
            job = self._jobs.get((peer, message.id))
            if job is not None:  # else it ended already: its Result is on its way
                self.scheduler.cancel(job, wire.service_error(message.error))

    def _submit(self, peer: bytes, message: wire.Submit) -> None:
        job = wire.job_of(message)
        job.on_done = self._on_done
        key = (peer, message.id)
        self._jobs[key], self._keys[job] = job, key
        try:
            self.scheduler.submit(job)
        except ServiceError as e:  # queue full, or stopping: answered at once
            job.error, job.finished = e, True
            self._send(job)

    def _on_done(self, job: Job) -> None:
        """A job ended (on an engine thread, or this one in a cancel): queue it and wake the loop."""
        self._done.put(job)
        with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is pending anyway
            os.write(self._wake_w, b"\0")

    def _send_done(self) -> None:
        while True:
            try:
                job = self._done.get_nowait()
            except queue.Empty:
                return
            self._send(job)

    def _send(self, job: Job) -> None:
        key = self._keys.pop(job, None)
        if key is None:
            return
        del self._jobs[key]
        peer, job_id = key
        # a front end that died meanwhile is no longer routable: ROUTER drops the message
        self._socket.send_multipart([peer, *wire.result_frames(job_id, job, self.scheduler.queue_depth())])


def describe(state: ServiceState) -> wire.Description:
    """The loaded models' metadata: what a front end needs to validate and plan requests."""
    models = [wire.ModelDescription(m.name, m.meta.to_json(), str(m.path), m.sha256, m.max_images_per_request)
              for m in state.registry]
    return wire.Description(models, state.registry.default)


def run_engine(settings: Settings, address: str, received: list[int]) -> int:
    """The engine process's work: load the models, then serve the front ends until SIGTERM; its exit status
    (1 when no model could be loaded)."""
    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, on_signal)
    if received:
        stop.set()
    torch.set_num_threads(settings.cpu_threads)
    state = ServiceState(settings, Engine)
    host = EngineHost(state.scheduler, lambda: describe(state), address)
    state.scheduler.start()
    if not state.load_models():
        return 1
    logger.info("engine process serving the front ends", extra={"fields": {"address": address}})
    try:
        host.serve(stop.is_set)
    finally:
        state.ready = False
        state.scheduler.stop()
        host.close()
    return 0

