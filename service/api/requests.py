"""What every request has, whichever layer answers it: its id, its arrival time and its access-log line."""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from typing import Any

access_logger = logging.getLogger("cmserve.access")

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/stats"})  # probes and scrapes: debug level
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ids = random.Random()  # request ids: unique, not secret (seeded from os.urandom)
Headers = list[tuple[bytes, bytes]]  # as ASGI and uvicorn's parser give them: lower-case names, raw values
# ASGI scope keys the HTTP protocol (protocol.py) sets for the app
ARRIVED_KEY = "cmserve.arrived"  # time.monotonic() when the request's headers arrived; deadlines count from it
READ_TIMED_OUT_KEY = "cmserve.read_timed_out"  # the RequestTimeout, once its body took longer than CM_READ_TIMEOUT_S


@dataclass(slots=True)
class Reply:
    """A response, whichever layer writes it: status, headers (lower-case names, no content-length), body."""

    status: int
    headers: Headers
    body: bytes


@dataclass
class RequestLog:
    """Per-request facts for the log line and the metrics, filled in as the request is answered."""

    request_id: str
    started: float  # time.monotonic() at arrival (its headers read); deadlines count from here
    model: str | None = None
    reason: str | None = None  # the failure-metric label, from the error that ended the request
    admitted: bool = False  # it passed the readiness check (ServiceState.admit): the drain waits for it
    fields: dict[str, Any] = field(default_factory=dict)  # n, steps, seed, timings ...


def new_request_log(headers: Headers, arrived: float) -> RequestLog:
    return RequestLog(request_id=request_id(headers), started=arrived)


def request_id(headers: Headers) -> str:
    """The client's X-Request-ID when it is sane, else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID_PATTERN.match(text):
                return text
            break
    return f"{_ids.getrandbits(128):032x}"


def log_request(method: str, path: str, log: RequestLog, status: int, seconds: float) -> None:
    """The access-log line of a request: info, or debug for probes and scrapes that succeeded."""
    level = logging.DEBUG if path in QUIET_PATHS and status < 500 else logging.INFO
    if not access_logger.isEnabledFor(level):
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
    access_logger.log(level, "request", extra={"fields": record})
