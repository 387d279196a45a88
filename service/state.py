"""The running server's state: its parts, the load-and-warm-up sequence, readiness and draining."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable

from .encode import Encoder
from .engine import device_labels
from .errors import Draining, NotReady
from .metrics import Metrics
from .registry import EngineFactory, Registry, check_model_files, load_model
from .scheduler import Scheduler
from .settings import Settings

logger = logging.getLogger("cmserve.state")


class ServiceState:
    """Everything a request handler needs, plus the lifecycle flags the probes report."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        devices = device_labels(settings.device_names)
        self.metrics = Metrics(settings.model_names, settings.buckets, devices)
        self.registry = Registry(settings.default_model_name)
        self.scheduler = Scheduler(
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_s,
            max_queue=settings.max_queue,
            observer=self.metrics,
            schedule=settings.schedule,
            devices=devices,
            pipeline=settings.pipeline,
        )
        self.encoder: Encoder | None = None
        self._ready = False
        self.draining = False
        self.failure: str | None = None  # why start-up failed, if it did
        self.in_flight = 0  # generate requests being handled, from their headers to their answer
        self.admitted = 0  # those of them that passed the readiness check (the drain waits for 0)
        self.on_fatal: Callable[[str], None] = lambda message: None  # __main__ stops the server here
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled: asyncio.Event | None = None  # set when ready or failed
        self.metrics.track_ready(lambda: self.ready)
        self.metrics.track_in_progress(lambda: self.in_flight)

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value
        self.metrics.refresh()  # with several workers, the others' scrapes see the change now

    def start(self) -> None:
        """Called by the lifespan: start the engine thread and load the models in the background."""
        check_model_files(self.settings)
        self._loop = asyncio.get_running_loop()
        self._settled = asyncio.Event()
        self.encoder = Encoder(self.settings.encode_threads)
        self.scheduler.start()
        threading.Thread(target=self._load_all, name="cmserve-loader", daemon=True).start()

    def stop(self) -> None:
        """Called by the lifespan at shutdown, after uvicorn has finished the in-flight requests."""
        self.ready = False
        self.draining = True
        gc.unfreeze()  # back to the collector (an app in a test process is not the whole process)
        self.scheduler.stop()
        if self.encoder is not None:
            self.encoder.close()

    def request_started(self) -> None:
        """A generate request arrived (the HTTP layer calls this and `request_ended` around each)."""
        self.in_flight += 1
        self.metrics.request_started()

    def request_ended(self) -> None:
        self.in_flight -= 1
        self.metrics.request_ended()

    def begin_drain(self) -> None:
        """SIGTERM: /readyz turns 503 and new requests are refused; in-flight ones go on."""
        if not self.draining:
            logger.info("draining: %d request(s) in flight", self.in_flight)
        self.draining = True
        self.ready = False

    async def wait_settled(self) -> None:
        """Wait until the models are loaded and warmed up (or loading failed)."""
        assert self._settled is not None, "the app's lifespan has not started"
        await self._settled.wait()

    def check_ready(self) -> None:
        if self.draining:
            raise Draining("the server is shutting down and accepts no new requests")
        if not self.ready:
            raise NotReady("the server is loading and warming up its models")

    def admit(self) -> None:
        """Take a request in (it then counts until `release`), or refuse it while loading or draining. Requests
        refused during a drain do not count: clients that keep sending cannot hold the drain up."""
        self.check_ready()
        self.admitted += 1

    def release(self) -> None:
        self.admitted -= 1

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        if self.failure:
            return "failed"
        return "ready" if self.ready else "loading"

    # ------------------------------------------------------------------ loading (background thread)

    def _load_all(self) -> None:
        self.load_models()
        assert self._loop is not None and self._settled is not None
        self._loop.call_soon_threadsafe(self._settled.set)

    def load_models(self) -> bool:
        """Load and warm up every model (a broken file is logged and skipped); whether any is served."""
        specs = check_model_files(self.settings)
        for spec in specs:
            try:
                served = load_model(spec, self.settings, self.engine_factory)
            except Exception as e:  # a broken file must not stop the other models from serving
                logger.error("model %s not served: %s", spec.name, e)
                continue
            self.registry.add(served)
            self.scheduler.add_model(served.name, *served.engines)
            self.metrics.set_model_info(served.name, served.sha256, served.meta.preset)
            self.metrics.track_queue_depth(served.name, lambda name=served.name: self.scheduler.queue_depth(name))
            for device, engine in zip(self.scheduler.devices, served.engines, strict=True):
                self.metrics.track_device_memory(engine.memory_bytes, device)
        if not len(self.registry):
            self.failure = "no model could be loaded (see the errors above)"
            logger.critical("start-up failed: %s", self.failure)
            self.on_fatal(self.failure)
        else:
            if self.registry.default not in self.registry.names():
                fallback = self.registry.names()[0]
                logger.warning("default model %s is not served; using %s", self.registry.default, fallback)
                self.registry.default = fallback
            # Everything loaded so far (torch, the app, the models) lives as long as the process: freeze it out
            # of the collector. Otherwise each full collection walks it all: long pauses under load.
            gc.collect()
            gc.freeze()
            self.ready = not self.draining
            logger.info("ready: serving %s (default %s)", self.registry.names(), self.registry.default)
        return bool(len(self.registry))
