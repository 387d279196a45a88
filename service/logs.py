"""Structured logs: one JSON object per line on stderr, for our records and uvicorn's alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import sys
import time
import traceback
from typing import Any, TextIO

import orjson

PIPE_BUF = getattr(select, "PIPE_BUF", 512)  # the largest write to a pipe that POSIX keeps whole (4096 on Linux)


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...fields}; `extra={"fields": {...}}` adds the fields.

    With CM_WORKERS > 1 each worker's lines also carry "worker": its index (0 is the first worker).
    """

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker
        self._second, self._stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            doc["worker"] = self.worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # what orjson cannot write (an integer beyond 64 bits): the standard encoder can
            return json.dumps(doc, ensure_ascii=False, default=str)

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime per second, not per line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"  # LogRecord.msecs, as logging computes it


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
