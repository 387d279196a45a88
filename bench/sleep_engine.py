"""A device stand-in for measuring the serving path on the CPU: an engine whose evaluation sleeps.

`bench.load --sleep-engine MS` serves the embedded default's shapes through the real `python -m service`
(protocol, handler, scheduler, encoding) with `Engine.evaluate` replaced by a sleep of MS per batch, whatever
its size up to CM_MAX_BATCH, returning the inputs clamped to [-1, 1] as the estimates. time.sleep releases the
GIL as a device kernel does, so the host's work can overlap it exactly as far as the serving path lets it; and
a sleep costs no CPU, so the served images/s ÷ (batch size ÷ sleep) is the share of the device's time the
serving path keeps busy. The default, 2 ms, is a launch-bound GPU evaluation of a small network: the digits
network is some 480 operators, a few µs of launch each, flat in the batch size up to a few hundred 8×8 images.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

DEFAULT_SLEEP_MS = 2.0
ENV = "CMSERVE_SLEEP_ENGINE_MS"  # not CM_: the service's settings are never given it


def sleeping_evaluate(ms: float) -> Callable[..., object]:
    """An `Engine.evaluate` that sleeps `ms` and returns its inputs clamped, as estimates of the right shape."""
    from service.engine import Evaluation

    seconds = ms / 1e3

    def evaluate(self: object, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Evaluation:
        time.sleep(seconds)
        return Evaluation(out=x.clamp(-1, 1), failed=[])

    return evaluate


def patch(ms: float) -> None:
    from service import engine

    engine.Engine.evaluate = sleeping_evaluate(ms)  # type: ignore[method-assign]


def serve(ms: float) -> int:
    """`python -m service` (settings from the environment) with every engine's evaluation a sleep of `ms`."""
    from service.__main__ import main

    os.environ[ENV] = str(ms)
    patch(ms)
    return main([])


# The processes the server spawns (CM_FRONTENDS' engine process) import their parent's main module, and with it
# this one, afresh: the variable set by `serve` makes their engines sleep too.
if os.environ.get(ENV):
    patch(float(os.environ[ENV]))
