"""A device stand-in for measuring the serving path on the CPU: an engine whose evaluation sleeps.

`bench.load --sleep-engine MS` serves the embedded default's shapes through the real `python -m service`
(protocol, handler, scheduler, encoding) with `Engine.evaluate` replaced by a sleep of MS per batch, whatever
its size up to CM_MAX_BATCH, returning the inputs clamped to [-1, 1] as the estimates. time.sleep releases the
GIL as a device kernel does, so the host's work can overlap it exactly as far as the serving path lets it; and
a sleep costs no CPU, so the served images/s ÷ (batch size ÷ sleep) is the share of the device's time the
serving path keeps busy. The default, 2 ms, is a launch-bound GPU evaluation of a small network: the digits
network is some 480 operators, a few µs of launch each, flat in the batch size up to a few hundred 8×8 images.

Like a GPU, the sleeping device is asynchronous by default: `evaluate` queues the batch and returns at once, the
batch is done a sleep after the device's previous one (or after its launch, when the device was free), and the
engine's `fence` waits for that. `sync=True` (`bench.load --sleep-sync`) makes `evaluate` sleep itself, as a
device whose work the scheduler cannot overlap: the A/B of the scheduler's pipelining.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

DEFAULT_SLEEP_MS = 2.0
ENV = "CMSERVE_SLEEP_ENGINE_MS"  # not CM_: the service's settings are never given it
SYNC_ENV = "CMSERVE_SLEEP_ENGINE_SYNC"  # "1": the synchronous device


def sleeping_evaluate(ms: float) -> Callable[..., object]:
    """An `Engine.evaluate` that sleeps `ms` and returns its inputs clamped, as estimates of the right shape."""
    from service.engine import Evaluation

    seconds = ms / 1e3

    def evaluate(self: object, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Evaluation:
        time.sleep(seconds)
        return Evaluation(out=x.clamp(-1, 1), failed=[])

    return evaluate


def queued_evaluate(ms: float) -> Callable[..., object]:
    """An `Engine.evaluate` that queues a sleep of `ms` on the engine's device and returns at once."""
    from service.engine import Evaluation

    seconds = ms / 1e3

    def evaluate(self: object, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Evaluation:
        free = getattr(self, "_sleep_done_at", 0.0)  # when the batch before is done
        self._sleep_done_at = max(free, time.monotonic()) + seconds  # type: ignore[attr-defined]
        return Evaluation(out=x.clamp(-1, 1), failed=[])

    return evaluate


def sleeping_fence(self: object) -> Callable[[], None]:
    """An `Engine.fence` for the queued sleeps: waits until the latest queued batch is done."""
    done_at = getattr(self, "_sleep_done_at", 0.0)
    return lambda: time.sleep(max(0.0, done_at - time.monotonic()))


def patch(ms: float, sync: bool = False) -> None:
    from service import engine

    if sync:
        engine.Engine.evaluate = sleeping_evaluate(ms)  # type: ignore[method-assign]
        return
    engine.Engine.evaluate = queued_evaluate(ms)  # type: ignore[method-assign]
    engine.Engine.fence = sleeping_fence  # type: ignore[method-assign]
    engine.Engine.asynchronous = property(lambda self: True)  # type: ignore[method-assign,assignment]


def serve(ms: float, sync: bool = False) -> int:
    """`python -m service` (settings from the environment) with every engine's evaluation a sleep of `ms`."""
    from service.__main__ import main

    os.environ[ENV] = str(ms)
    os.environ[SYNC_ENV] = "1" if sync else "0"
    patch(ms, sync)
    return main([])


# The processes the server spawns (CM_FRONTENDS' engine process) import their parent's main module, and with it
# this one, afresh: the variable set by `serve` makes their engines sleep too.
if os.environ.get(ENV):
    patch(float(os.environ[ENV]), os.environ.get(SYNC_ENV) == "1")
