"""Structured logs: one JSON object per line on stderr, for our records and uvicorn's alike."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)  # made once: json.dumps with options makes one a call


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...fields}; `extra={"fields": {...}}` adds the fields.

    With CM_WORKERS > 1 each worker's lines also carry "worker": its index (0 is the first worker).
    """

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker
        self._second, self._stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        doc: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
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
        return _ENCODER.encode(doc)


class LineHandler(logging.Handler):
    """Writes each record as one line; the lines of one event-loop iteration go out in one write.

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
            line = self.format(record) + "\n"
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
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_on = None
            self._write_pending()

    def _write_pending(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self.stream.write(text)
            self.stream.flush()


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
