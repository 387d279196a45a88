"""Structured logs: one JSON object per line on stderr, for our records and uvicorn's alike."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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


def configure_logging(level: str = "info", worker: int | None = None) -> None:
    """JSON lines on stderr at `level` for cmserve and uvicorn; uvicorn's access log is ours instead."""
    handler = logging.StreamHandler(sys.stderr)
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
