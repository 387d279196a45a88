"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers and slows every request).

- `BodyLimit`: 413 for a body over CM_MAX_BODY_BYTES, by Content-Length at once, or by counting the
  streamed bytes (chunked bodies, or a Content-Length that lies) — nothing past the cap is kept.
- `RequestContext`: request id (X-Request-ID echoed when sane, else generated), one JSON log line per
  request, and for POST /v1/generate the in-flight count, the request metrics and their failure reason.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..logs import log_fields
from ..metrics import UNKNOWN_MODEL
from ..state import ServiceState
from .errors import CLIENT_CLOSED_REQUEST, error_response

access_logger = logging.getLogger("cmserve.access")

GENERATE_PATH = "/v1/generate"
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/stats"})  # probes and scrapes: debug level
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LOG_KEY = "cmserve.log"
_ids = random.Random()  # request ids: unique, not secret (seeded from os.urandom)
REASON_BY_STATUS = {401: "invalid", 404: "invalid", 406: "invalid", 413: "invalid", 415: "invalid", 422: "invalid",
                    429: "rejected", 503: "rejected", 504: "timeout", CLIENT_CLOSED_REQUEST: "cancelled"}


class BodyTooLarge(HTTPException):
    """Raised from `receive` when the streamed body passes the cap; FastAPI passes HTTPExceptions through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes (CM_MAX_BODY_BYTES)")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length <= self.max_bytes:
            await self.app(scope, receive, send)  # the HTTP parser enforces Content-Length framing
            return
        if length is not None:  # declared too large: answer without reading a byte of it
            await error_response(413, "body_too_large", BodyTooLarge(self.max_bytes).detail)(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:  # raised where no handler turned it into a response
            if started:
                raise
            await error_response(413, "body_too_large", e.detail)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


@dataclass
class RequestLog:
    """Per-request facts the route fills in for the log line and the metrics."""

    request_id: str
    started: float  # time.monotonic() at arrival
    model: str | None = None
    reason: str | None = None  # failure-metric reason when the route knows better than the status code
    fields: dict[str, Any] = field(default_factory=dict)  # n, steps, timings ...


def request_log(scope: Scope) -> RequestLog:
    return scope[LOG_KEY]


class RequestContext:
    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        log = RequestLog(request_id=request_id(scope["headers"]), started=time.monotonic())
        scope[LOG_KEY] = log
        generate = scope["path"] == GENERATE_PATH and scope["method"] == "POST"
        status = 500  # if the app raises before answering, the outer error middleware answers 500
        header = (b"x-request-id", log.request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        if generate:
            self.state.request_started()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if generate:
                self.state.request_ended()
            end_request(self.state, log, scope["method"], scope["path"], status, time.monotonic() - log.started,
                        generate)


def end_request(state: ServiceState, log: RequestLog, method: str, path: str, status: int, seconds: float,
                generate: bool) -> None:
    """A request's metrics (generate requests) and its log line; also for protocol.py's requests."""
    if generate:
        reason = log.reason or (None if status < 400 else REASON_BY_STATUS.get(status, "error"))
        state.metrics.observe_request(log.model or UNKNOWN_MODEL, status, seconds, reason)
    _log_request(method, path, log, status, seconds)


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is sane, else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID_PATTERN.match(text):
                return text
            break
    return f"{_ids.getrandbits(128):032x}"


def _log_request(method: str, path: str, log: RequestLog, status: int, seconds: float) -> None:
    level = logging.DEBUG if path in QUIET_PATHS and status < 500 else logging.INFO
    if not access_logger.isEnabledFor(level):  # (log_fields checks it too: this skips building the fields)
        return
    record = {
        "request_id": log.request_id,
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
    }
    if log.model is not None:
        record["model"] = log.model
    record.update(log.fields)
    log_fields(access_logger, level, "request", record)
