"""Structured logs: one JSON object per line on stderr, for our records and uvicorn's alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import select
import sys
import time
import traceback
from typing import Any, TextIO

PIPE_BUF = getattr(select, "PIPE_BUF", 512)  # the largest write to a pipe that POSIX keeps whole (4096 on Linux)
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)  # made once: json.dumps with options makes one a call
_STRING = json.encoder.encode_basestring  # a str as _ENCODER writes it (quoted, non-ASCII kept)
# The access log's line for an answered POST /v1/generate, the most common line by far: its fields in order and
# their types (the timings are floats). `JsonFormatter.fixed_line` writes it from a template.
ACCESS_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "model", "n", "steps", "seed", "timings_ms")
ACCESS_TYPES = (str, str, str, int, float, str, int, int, int, dict)
TIMING_FIELDS = ("queue", "compute", "encode", "total")


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...fields}; `extra={"fields": {...}}` adds the fields.

    With CM_WORKERS > 1 each worker's lines also carry "worker": its index (0 is the first worker).
    """

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker
        self._second, self._stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        doc = self.document(record.created, record.levelname, record.name, record.getMessage(),
                            fields if isinstance(fields, dict) else None)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(doc)

    def document(self, created: float, levelname: str, name: str, msg: str, fields: dict[str, Any] | None) -> dict:
        doc: dict[str, Any] = {
            "ts": self._timestamp(created),
            "level": levelname.lower(),
            "logger": name,
            "msg": msg,
        }
        if self.worker is not None:
            doc["worker"] = self.worker
        if fields:
            doc.update(fields)
        return doc

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime per second, not per line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"  # LogRecord.msecs, as logging computes it

    def fixed_line(self, created: float, levelname: str, name: str, msg: str, fields: dict[str, Any]) -> str | None:
        """The JSON of `document(...)` for an access record of ACCESS_FIELDS, from a template; None for any other.

        The same text as the JSON encoder writes (a test compares them), in about three quarters of its time
        (4.4 against 6.0 µs on the 2-core VM): the encoder walks the record field by field, and this line is
        written for every request.
        """
        if tuple(fields) != ACCESS_FIELDS:
            return None
        values = tuple(fields.values())
        if tuple(map(type, values)) != ACCESS_TYPES:
            return None
        timings = values[9]
        if tuple(timings) != TIMING_FIELDS:
            return None
        times = (values[4], *timings.values())
        if tuple(map(type, times)) != (float,) * 5 or not all(map(math.isfinite, times)):
            return None  # (json writes NaN and Infinity, repr() nan and inf)
        head = (f'{{"ts": "{self._timestamp(created)}", "level": {_STRING(levelname.lower())}, '
                f'"logger": {_STRING(name)}, "msg": {_STRING(msg)}, ')
        if self.worker is not None:
            head += f'"worker": {self.worker:d}, '
        rid, method, path, status, duration, model, n, steps, seed, _ = values
        return (f'{head}"request_id": {_STRING(rid)}, "method": {_STRING(method)}, "path": {_STRING(path)}, '
                f'"status": {status:d}, "duration_ms": {duration!r}, "model": {_STRING(model)}, "n": {n:d}, '
                f'"steps": {steps:d}, "seed": {seed:d}, "timings_ms": {{"queue": {times[1]!r}, '
                f'"compute": {times[2]!r}, "encode": {times[3]!r}, "total": {times[4]!r}}}}}')


def log_fields(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any]) -> None:
    """logger.log(level, msg, extra={"fields": fields}), without a LogRecord when only our handler would see it.

    For the access log (a line per request): building the LogRecord and running the logging machinery cost
    more than the line itself. When `configure_logging`'s handler alone would handle the record (no other
    handler or filter on the way, as in the server), the line is formatted and queued directly, identical
    to the one logging would write; with any other set-up (a test's caplog, an embedding application's
    handlers) the record goes through logging as usual.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _sole_line_handler(logger, level)
    if handler is None:
        logger.log(level, msg, extra={"fields": fields})
        return
    formatter: JsonFormatter = handler.formatter  # type: ignore[assignment]
    with handler.lock:  # type: ignore[union-attr]
        created, levelname = time.time(), logging.getLevelName(level)
        line = formatter.fixed_line(created, levelname, logger.name, msg, fields)
        if line is None:
            line = _ENCODER.encode(formatter.document(created, levelname, logger.name, msg, fields))
        handler.queue(line + "\n")


def _sole_line_handler(logger: logging.Logger, level: int) -> LineHandler | None:
    """The LineHandler (with a JsonFormatter) that alone would handle a record of `logger` at `level`, or None."""
    found = None
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters:
            return None
        for handler in node.handlers:
            if (found is not None or type(handler) is not LineHandler or handler.filters or level < handler.level
                    or type(handler.formatter) is not JsonFormatter):
                return None
            found = handler
        node = node.parent if node.propagate else None
    return found


class LineHandler(logging.Handler):
    """Writes each record as one line; the lines of one event-loop iteration go out together (_write_pending).

    Under load one loop iteration answers many requests, and a write to stderr per access-log line
    (stderr is line-buffered) cost about as much as the rest of the line. Lines from a thread with no
    running event loop are written at once; those from the loop's thread are written by a callback the
    loop runs next, before it waits for I/O again, so none waits longer than one iteration.
    """

    MAX_PENDING = 256  # lines held at most; beyond that the handler writes at once

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop that will write the pending lines

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self.queue(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def queue(self, line: str) -> None:
        """Write `line` now, or after this loop iteration when called on an event loop's thread (hold self.lock)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._pending.append(line)
        if loop is None or len(self._pending) >= self.MAX_PENDING:
            self._write_pending()
        elif self._flush_on is not loop:  # (a loop that closed before its callback ran is replaced)
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_on = None
            self._write_pending()

    def _write_pending(self) -> None:
        """The pending lines in writes of at most PIPE_BUF bytes, each ending at a line's end.

        The workers of CM_WORKERS > 1 share one stderr (often a pipe: docker, systemd), and only a write of
        up to PIPE_BUF bytes to a pipe is atomic: a larger one could interleave with another worker's lines.
        A single line longer than that goes in a write of its own, as a line-per-write handler would do.
        """
        pending, self._pending = self._pending, []
        chunk: list[str] = []
        size = 0
        for line in pending:
            length = len(line.encode()) if not line.isascii() else len(line)
            if chunk and size + length > PIPE_BUF:
                self._write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += length
        if chunk:
            self._write("".join(chunk))

    def _write(self, text: str) -> None:
        """As logging's handlers do (handleError), a write that fails drops its lines and never raises: the
        caller may be the event loop's callback, and stderr may be a pipe whose reader is gone."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            if logging.raiseExceptions:
                with contextlib.suppress(Exception):
                    traceback.print_exc(file=sys.stderr)


def configure_logging(level: str = "info", worker: int | None = None) -> None:
    """JSON lines on stderr at `level` for cmserve and uvicorn; uvicorn's access log is ours instead."""
    handler = LineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # The lines carry none of these, so skip gathering them for every record (the logging HOWTO's
    # "Optimization" section): the caller's file and line, thread, process and multiprocessing names.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
