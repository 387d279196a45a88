"""`python -m service [--config FILE]`: serve the configured models with uvicorn.

SIGTERM (or Ctrl+C) drains: /readyz turns 503 and new requests get 503 while the listener stays open
(load balancers see the replica leave), in-flight requests finish within CM_DRAIN_S, then the server
closes and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time
from types import FrameType

import torch
import uvicorn

from .app import create_app
from .engine import resolve_device
from .logs import configure_logging
from .registry import ModelFilesError, check_model_files
from .settings import Settings, SettingsError, load_settings, settings_table
from .state import ServiceState

logger = logging.getLogger("cmserve.main")

EXIT_CONFIG = 2  # settings or model files unusable
EXIT_STARTUP = 1  # no model could be loaded


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before shutting down, and which exits 0."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_s = drain_s
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
        if self._drain_requested and self._drain_started is None:
            self._drain_started = time.monotonic()
            self.state.begin_drain()
        if self._drain_started is not None:
            elapsed = time.monotonic() - self._drain_started
            if self.state.in_flight == 0 or elapsed >= self.drain_s:
                if self.state.in_flight:
                    logger.error("drain time CM_DRAIN_S=%gs is up with %d request(s) in flight",
                                 self.drain_s, self.state.in_flight)
                self.config.timeout_graceful_shutdown = max(1.0, self.drain_s - elapsed)
                return True
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("listening", extra={"fields": {"host": host, "port": port}})


def build_server(settings: Settings) -> tuple[DrainingServer, ServiceState]:
    app = create_app(settings)
    state: ServiceState = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # logging is configured by configure_logging (JSON lines)
        access_log=False,  # cmserve.access logs one line per request instead
        server_header=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_s)),
        lifespan="on",
    )
    server = DrainingServer(config, state, settings.drain_s)

    def fatal(message: str) -> None:
        server.should_exit = True

    state.on_fatal = fatal
    return server, state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE", help="dotenv-style file of CM_NAME=value settings")
    parser.add_argument("--settings-table", action="store_true", help="print every setting (Markdown) and exit")
    args = parser.parse_args(argv)
    if args.settings_table:
        sys.stdout.write(settings_table() + "\n")
        return 0
    configure_logging("info")
    try:
        settings = load_settings(args.config)
        configure_logging(settings.log_level)
        resolve_device(settings.device)
        check_model_files(settings)
    except (SettingsError, ModelFilesError, ValueError) as e:
        logger.error("cannot start: %s", e)
        return EXIT_CONFIG
    torch.set_num_threads(settings.cpu_threads)  # leave a core to the event loop (and no OpenMP stalls on 2)
    server, state = build_server(settings)
    server.run()
    if state.failure:
        logger.error("exiting: %s", state.failure)
        return EXIT_STARTUP
    return 0


if __name__ == "__main__":
    sys.exit(main())
