"""Running the app under uvicorn: one process, or CM_WORKERS processes on one listening socket.

SIGTERM (or Ctrl+C) drains: /readyz turns 503 and new requests get 503 while the listener stays open
(load balancers see the replica leave), in-flight requests finish within CM_DRAIN_S, then the server
closes and the process exits 0. A second signal stops at once.

With CM_WORKERS = N > 1 (CPU only) the parent binds one SO_REUSEPORT socket per worker on the port and starts
N workers with the spawn method; each is a whole server (models, engine thread, event loop) accepting from its
socket, so the HTTP work of a busy CPU server spreads over processes instead of queueing behind one
interpreter lock.
prometheus_client's multiprocess mode makes /metrics of any worker report all of them. The parent passes
SIGTERM/SIGINT on (each worker drains its own requests), replaces a worker that dies while serving, and
stops everything when a worker cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from .api.protocol import UVICORN_VERSION, GenerateProtocol, Limits, ServiceProtocol, check_connections
from .app import create_app
from .logs import configure_logging
from .metrics import MULTIPROC_ENV
from .settings import Settings, worker_cpus
from .signals import HANDLED_SIGNALS, hold_signals
from .state import ServiceState

logger = logging.getLogger("cmserve.main")

EXIT_CONFIG = 2  # settings or model files unusable
EXIT_STARTUP = 1  # no model could be loaded
RESTART_WINDOW_S = 60.0  # a worker dying more than MAX_RESTARTS times in this window stops the server
MAX_RESTARTS = 5
PR_SET_PDEATHSIG = 1  # linux/prctl.h
READ_CHECK_TICKS = 5  # connections are checked every this many ticks of uvicorn's main loop (0.1 s each)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before shutting down, and which exits 0.

    `received`: the list `hold_signals` fills, with the signals that came before uvicorn installed this server's
    handler (`handle_exit`, from `serve` on; it puts the holding one back when the server ends): it drains at once.
    """

    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_s: float, read_timeout_s: float,
                 received: Sequence[int] = ()) -> None:
        super().__init__(config)
        self.state = state
        self.drain_s = drain_s
        self.read_timeout_s = read_timeout_s
        self._received = received
        self._drain_requested = False
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's own handler, do not re-raise the signal after shutdown: a drained exit is 0.
        if self._drain_requested:
            logger.warning("second %s: stopping now", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._received and not self._drain_requested:  # a signal came before uvicorn's handlers were in place
            self._drain_requested = True
        if self._drain_requested and self._drain_started is None:
            self._drain_started = time.monotonic()
            self.state.begin_drain()
        if self._drain_started is not None:
            elapsed = time.monotonic() - self._drain_started
            if self.state.admitted == 0 or elapsed >= self.drain_s:
                if self.state.admitted:
                    logger.error("drain time CM_DRAIN_S=%gs is up with %d request(s) in flight",
                                 self.drain_s, self.state.admitted)
                self.config.timeout_graceful_shutdown = max(1.0, self.drain_s - elapsed)
                return True
        if counter % READ_CHECK_TICKS == 0:
            check_connections(self.server_state.connections, asyncio.get_running_loop().time(), self.read_timeout_s)
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("listening", extra={"fields": {"host": host, "port": port}})


def build_server(settings: Settings, received: Sequence[int] = (),
                 engine_address: str | None = None) -> tuple[DrainingServer, ServiceState]:
    app = create_app(settings, engine_address=engine_address)
    state: ServiceState = app.state.service
    config = uvicorn.Config(
        app,
        http=http_protocol(settings, app),
        host=settings.host,
        port=settings.port,
        log_config=None,  # logging is configured by configure_logging (JSON lines)
        access_log=False,  # cmserve.access logs one line per request instead
        server_header=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_s)),
        lifespan="on",
    )
    server = DrainingServer(config, state, settings.drain_s, settings.read_timeout_s, received)

    def fatal(message: str) -> None:
        server.should_exit = True

    state.on_fatal = fatal
    return server, state


def http_protocol(settings: Settings, app: FastAPI) -> Any:
    """uvicorn's `http`: service/api/protocol.py's, with the head cap and read timeout; the one that also
    answers generate requests itself unless that is turned off or OpenTelemetry is on (its spans wrap FastAPI's
    app, which that protocol's requests skip). uvicorn's own where uvicorn is another version than the one
    they were written for."""
    if uvicorn.__version__ != UVICORN_VERSION:
        logger.warning("uvicorn %s is not the version %s that service/api/protocol.py was written for; requests go "
                       "through uvicorn's own protocol, without CM_MAX_HEADER_BYTES, CM_MAX_HEADERS or "
                       "CM_READ_TIMEOUT_S", uvicorn.__version__, UVICORN_VERSION)
        return "auto"
    limits = Limits.of(settings)
    if not settings.protocol_fast_path or settings.opentelemetry:
        return functools.partial(ServiceProtocol, limits=limits)
    handlers = {handler.endpoint.path.encode(): handler for handler in (app.state.generate, app.state.edit)}
    return functools.partial(GenerateProtocol, limits=limits, handlers=handlers)


def serve(settings: Settings, sockets: list[socket.socket] | None = None, received: Sequence[int] = (),
          engine_address: str | None = None) -> int:
    """Run one server process until it is stopped; its exit status. `received`: signals held before (it drains
    at once); `engine_address`: a front end's engine process (CM_FRONTENDS)."""
    torch.set_num_threads(1 if engine_address else settings.cpu_threads)
    server, state = build_server(settings, received, engine_address)
    server.run(sockets)
    if state.failure:
        logger.error("exiting: %s", state.failure)
        return EXIT_STARTUP
    return 0


def exit_now(code: int) -> None:
    """End the process once the server has ended: logs and standard streams flushed, then os._exit, without
    the interpreter's teardown (collecting torch's hundreds of thousands of objects takes seconds on a busy
    machine, which would push a drained exit past CM_DRAIN_S; nothing of the service needs it)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ---------------------------------------------------------------------- several workers


def _child_setup(parent: int) -> list[int]:
    """A child process: its own process group (the parent relays Ctrl+C once), gone with its parent; the
    signals held since it started."""
    received = hold_signals()
    os.setpgrp()
    with contextlib.suppress(OSError, AttributeError):  # Linux: SIGTERM when the parent dies, even by SIGKILL
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        raise SystemExit(0)
    return received


def _worker_main(settings: Settings, sock: socket.socket, index: int, parent: int) -> None:
    """A worker process of CM_WORKERS."""
    received = _child_setup(parent)
    configure_logging(settings.log_level, worker=index)
    cpus = worker_cpus(index, settings.workers) if settings.cpu_affinity else None
    if cpus is not None:
        settings = settings.model_copy(update={"torch_threads": settings.cpu_threads})  # counted before pinning
        os.sched_setaffinity(0, cpus)  # before torch starts its threads: they inherit it
        logger.info("worker %d runs on CPUs %s", index, cpus, extra={"fields": {"cpus": cpus}})
    exit_now(serve(settings, [sock], received))


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    reaped: bool = False  # its exit has been handled


class Supervisor:
    """Starts CM_WORKERS workers on the port and keeps them running until a signal stops them."""

    def __init__(self, settings: Settings, received: Sequence[int] = ()) -> None:
        self.settings = settings
        self._received = received  # signals held before it ran (hold_signals)
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads and torch state
        self._signals: list[int] = []
        self._stopping = False
        self._restarts: list[float] = []
        self._status = 0

    def run(self) -> int:
        count = self._processes()
        sockets = bind_sockets(self.settings.host, self.settings.port, count)
        host, port = sockets[0].getsockname()[:2]
        metrics_dir, own_dir = _multiprocess_dir()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        self._signals.extend(self._received)
        try:
            logger.info("listening", extra={"fields": {"host": host, "port": port, **self._listening_fields()}})
            self._before_start()
            workers = [self._start(i, sockets[i]) for i in range(count)]
            self._supervise(workers, sockets)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sock in sockets:
                sock.close()
            self._after_stop()
            if own_dir:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return self._status

    def _processes(self) -> int:
        """How many processes share the port."""
        return self.settings.workers

    def _listening_fields(self) -> dict[str, int]:
        return {"workers": self.settings.workers, "torch_threads": self.settings.cpu_threads}

    def _before_start(self) -> None:
        """Runs once before the processes on the port start."""

    def _after_stop(self) -> None:
        """Runs once they have all ended."""

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)

    def _start(self, index: int, sock: socket.socket) -> _Worker:
        process = self._ctx.Process(target=_worker_main, args=(self.settings, sock, index, os.getpid()),
                                    name=f"cmserve-worker-{index}")
        return self._started(index, process)

    @staticmethod
    def _started(index: int, process: BaseProcess) -> _Worker:
        process.start()
        logger.info("worker started", extra={"fields": {"worker": index, "pid": process.pid}})
        return _Worker(index, process)

    def _supervise(self, workers: list[_Worker], sockets: list[socket.socket]) -> None:
        while any(w.process.is_alive() for w in workers) or not self._stopping:
            time.sleep(0.1)
            self._relay_signals(workers)
            self._reap(workers, sockets)

    def _relay_signals(self, workers: list[_Worker]) -> None:
        while self._signals:  # each signal is passed on: the first drains, a second stops at once
            sig = self._signals.pop(0)
            logger.info("%s: passing it on to the workers", signal.Signals(sig).name)
            self._stopping = True
            self._terminate(workers)

    def _reap(self, workers: list[_Worker], sockets: list[socket.socket]) -> None:
        for i, worker in enumerate(workers):
            if worker.reaped or worker.process.is_alive() or worker.process.exitcode is None:
                continue
            worker.reaped = True
            code = worker.process.exitcode
            _mark_dead(worker.process.pid)
            if self._stopping:
                if code and not self._status:  # a worker that did not drain cleanly (< 0: killed by a signal)
                    self._status = code if code > 0 else 1
                continue
            workers[i] = self._after_death(worker, code, workers, sockets[i])

    def _after_death(self, worker: _Worker, code: int, workers: list[_Worker], sock: socket.socket) -> _Worker:
        """Replace a worker that died while serving; stop all when it could not start or keeps dying."""
        fields = {"worker": worker.index, "pid": worker.process.pid, "exit_code": code}
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
        if code in (EXIT_STARTUP, EXIT_CONFIG) or len(self._restarts) > MAX_RESTARTS:
            logger.critical("worker ended and will not be replaced; stopping the server", extra={"fields": fields})
            self._status = code if code in (EXIT_STARTUP, EXIT_CONFIG) else EXIT_STARTUP
            self._stopping = True
            self._terminate(workers)
            return worker
        logger.error("worker died; starting a replacement", extra={"fields": fields})
        return self._start(worker.index, sock)

    @staticmethod
    def _terminate(workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)


# ---------------------------------------------------------------------- front ends and one engine process


def _frontend_main(settings: Settings, sock: socket.socket, index: int, parent: int, address: str) -> None:
    """A front-end process of CM_FRONTENDS: uvicorn on its socket, jobs to the engine process at `address`."""
    received = _child_setup(parent)
    configure_logging(settings.log_level, worker=index)
    exit_now(serve(settings, [sock], received, engine_address=address))


def _engine_main(settings: Settings, address: str, parent: int) -> None:
    """The engine process of CM_FRONTENDS (service/enginehost.py)."""
    received = _child_setup(parent)
    configure_logging(settings.log_level)
    from .enginehost import run_engine

    exit_now(run_engine(settings, address, received))


class FrontendSupervisor(Supervisor):
    """CM_FRONTENDS > 1: one engine process (models, queue, devices) and CM_FRONTENDS front ends on the port.

    A signal drains the front ends first (each finishes its in-flight requests within CM_DRAIN_S), then stops the
    engine process. A front end that dies is replaced; the engine process dying stops the server (exit 1).
    """

    def __init__(self, settings: Settings, received: Sequence[int] = ()) -> None:
        super().__init__(settings, received)
        self._ipc_dir = ""
        self._address = ""
        self._engine: BaseProcess | None = None
        self._engine_signalled = False

    def _processes(self) -> int:
        return self.settings.frontends

    def _listening_fields(self) -> dict[str, int]:
        return {"frontends": self.settings.frontends}

    def _before_start(self) -> None:
        """A private (0700) folder for the engine's socket, then the engine process."""
        self._ipc_dir = tempfile.mkdtemp(prefix="cmserve-ipc-")
        self._address = f"ipc://{self._ipc_dir}/engine"
        self._engine = self._ctx.Process(target=_engine_main, args=(self.settings, self._address, os.getpid()),
                                         name="cmserve-engine")
        self._engine.start()
        logger.info("engine process started", extra={"fields": {"pid": self._engine.pid}})

    def _after_stop(self) -> None:
        if self._ipc_dir:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def _start(self, index: int, sock: socket.socket) -> _Worker:
        process = self._ctx.Process(target=_frontend_main,
                                    args=(self.settings, sock, index, os.getpid(), self._address),
                                    name=f"cmserve-frontend-{index}")
        return self._started(index, process)

    def _supervise(self, workers: list[_Worker], sockets: list[socket.socket]) -> None:
        engine = self._engine
        assert engine is not None
        while True:
            time.sleep(0.1)
            self._relay_signals(workers)
            self._reap(workers, sockets)
            if not engine.is_alive():
                self._engine_ended(engine, workers)
                if not any(w.process.is_alive() for w in workers):
                    return
            elif self._stopping and not any(w.process.is_alive() for w in workers) and not self._engine_signalled:
                self._engine_signalled = True  # the front ends have drained: the engine holds no more work
                with contextlib.suppress(ProcessLookupError):
                    os.kill(engine.pid, signal.SIGTERM)  # type: ignore[arg-type]

    def _engine_ended(self, engine: BaseProcess, workers: list[_Worker]) -> None:
        code = engine.exitcode
        if self._engine_signalled and code == 0:
            return
        if not self._status:
            logger.critical("the engine process ended; stopping the server",
                            extra={"fields": {"pid": engine.pid, "exit_code": code}})
            self._status = code if code in (EXIT_STARTUP, EXIT_CONFIG) else EXIT_STARTUP
        self._stopping = True
        for worker in workers:  # nothing can answer their requests now
            if worker.process.is_alive() and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGKILL)


def bind_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker on the same port (SO_REUSEPORT: the kernel spreads new connections
    evenly over them; on one shared socket, whichever worker wakes first accepts a whole burst of
    connections and keeps them). Where SO_REUSEPORT is missing, the workers share one socket."""
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    sockets: list[socket.socket] = []
    try:
        for _ in range(count if reuse_port else 1):
            sockets.append(_listen(host, port, reuse_port))
            port = sockets[0].getsockname()[1]  # port 0 picked a free port: the others take the same one
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets if reuse_port else sockets * count


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _multiprocess_dir() -> tuple[str, bool]:
    """The prometheus_client multiprocess directory: $PROMETHEUS_MULTIPROC_DIR emptied, or a fresh one."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):  # values of an earlier run would be summed into this one's
            if name.endswith(".db"):
                os.remove(os.path.join(given, name))
        return given, False
    path = tempfile.mkdtemp(prefix="cmserve-metrics-")
    os.environ[MULTIPROC_ENV] = path  # inherited by the spawned workers before they import prometheus_client
    return path, True


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges (queue depth, requests in progress, ready) from the totals."""
    if pid is None or not os.environ.get(MULTIPROC_ENV):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
