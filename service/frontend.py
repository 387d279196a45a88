"""A front-end process of CM_FRONTENDS > 1: HTTP, validation, planning, encoding and replies, with no model.

Its `FrontendState` is the ServiceState the request path knows, with a `RemoteScheduler` in place of the
Scheduler: the same submit / cancel / queue_depth, carried to the engine process (service/enginehost.py) as
service/wire.py messages over a zmq DEALER socket on the event loop. The models' metadata (config, schedules,
limits, class names) comes from the engine process once its models are loaded; the front end is ready then.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.asyncio

from models.checkpoint import CheckpointMeta

from . import wire
from .encode import Encoder
from .engine import Engine
from .errors import NotReady, ServiceError
from .registry import ServedModel
from .scheduler import Job
from .settings import Settings
from .state import ServiceState

logger = logging.getLogger("cmserve.frontend")


class RemoteScheduler:
    """The Scheduler's interface for the request path, in a front end: a submitted Job goes to the engine process,
    and is completed (images, labels, error, timings) and its `on_done` called on the event loop when its Result
    comes back. A refusal (queue full, shutting down) comes back as a Result with that error."""

    def __init__(self, address: str, context: zmq.asyncio.Context | None = None) -> None:
        self.address = address
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._ids = itertools.count()
        self._pending: dict[int, Job] = {}  # by the id sent with it
        self._id_of: dict[Job, int] = {}
        self._depth = 0  # the engine's queue depth at its latest Result
        self._receiver: asyncio.Task[None] | None = None

    def start(self, on_description: Callable[[wire.Description], None]) -> None:
        """Connect (on the running loop) and ask for the models; `on_description` gets the answer."""
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.address)
        self._socket = sock
        self._send(wire.Describe())
        self._receiver = asyncio.get_running_loop().create_task(self._receive(on_description))

    def stop(self) -> None:
        """Fail what is still waiting (the drain is over) and close the socket."""
        for job in list(self._pending.values()):
            self.cancel(job, NotReady("the server shut down before this request finished"))
        if self._receiver is not None:
            self._receiver.cancel()
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    def submit(self, job: Job) -> None:
        if self._socket is None:
            raise NotReady("the server is shutting down")
        job_id = next(self._ids)
        self._pending[job_id], self._id_of[job] = job, job_id
        job.submitted_at = time.monotonic()  # the engine's own submission time replaces it
        self._send(wire.submit_message(job_id, job))

    def cancel(self, job: Job, error: ServiceError) -> bool:
        """End a job with `error` here and now, and tell the engine to drop its images; False if it had ended."""
        job_id = self._id_of.pop(job, None)
        if job_id is None:
            return False
        del self._pending[job_id]
        job.finished, job.error, job.finished_at = True, error, time.monotonic()
        if self._socket is not None:
            self._send(wire.Cancel(job_id, wire.error_message(error)))
        job.on_done(job)
        return True

    def queue_depth(self, model: str | None = None) -> int:
        """Images waiting in the engine process, as of its latest answer."""
        return self._depth

    def _send(self, message: wire.ToEngine) -> None:
        assert self._socket is not None
        self._socket.send(wire.encode(message))  # DEALER never blocks on a connected peer below its HWM

    async def _receive(self, on_description: Callable[[wire.Description], None]) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            message = wire.decode_to_frontend(frames[0].bytes)
            if isinstance(message, wire.Description):
                on_description(message)
                continue
            self._depth = message.queue_depth
            job = self._pending.pop(message.id, None)
            if job is None:  # cancelled here already
                continue
            del self._id_of[job]
            wire.complete(job, message, frames[1].buffer if len(frames) > 1 else None)
            job.on_done(job)


class FrontendState(ServiceState):
    """A front end's state: the request path's, with the engine process behind a RemoteScheduler."""

    def __init__(self, settings: Settings, address: str) -> None:
        super().__init__(settings, Engine)  # the engine factory is never called here
        self.scheduler = RemoteScheduler(address)  # type: ignore[assignment]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._settled = asyncio.Event()
        self.encoder = Encoder(self.settings.encode_threads)
        self.scheduler.start(self._described)  # type: ignore[call-arg]

    def stop(self) -> None:
        self.ready = False
        self.draining = True
        self.scheduler.stop()
        if self.encoder is not None:
            self.encoder.close()

    def _described(self, description: wire.Description) -> None:
        """The engine's models, without weights: enough to validate and plan every request."""
        if self._settled is not None and self._settled.is_set():
            return
        for model in description.models:
            meta = CheckpointMeta.from_json(model.meta)
            self.registry.add(ServedModel(
                name=model.name, engine=None, meta=meta, path=Path(model.path), sha256=model.sha256,
                max_steps=self.settings.max_steps, max_images_per_request=model.max_images_per_request))
        self.registry.default = description.default
        self.ready = not self.draining
        logger.info("ready: serving %s (default %s)", self.registry.names(), self.registry.default)
        assert self._settled is not None
        self._settled.set()

