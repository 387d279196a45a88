"""SIGTERM and SIGINT held from the start of `python -m service` until the server installs its own handlers.

Imported before torch and the models (seconds of work), so that a signal in that window, or after the server
ended and restored these handlers, is never fatal: it is noted, the server drains at once when it comes up
(service/server.py), and the exit status stays that of a drain (0), not death by the signal (143).
"""

from __future__ import annotations

import signal
from types import FrameType

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_held: list[int] = []  # the signals that arrived while `_hold` was their handler


def hold_signals() -> list[int]:
    """Install the holding handler (main thread only); the returned list fills as signals arrive."""
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, _hold)
    return _held


def _hold(sig: int, frame: FrameType | None) -> None:
    _held.append(sig)
