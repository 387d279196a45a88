"""CM_DEVICES in-process: two CPU "devices" (two engines, each with its own copy of the model and its own thread)
behind one queue. The same images as one device, both devices used, a drain, and a fault on one device."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from service.engine import Engine
from tests.integration.conftest import (
    OOMAboveEngine,
    app_settings,
    decode_b64,
    metric,
    metric_samples,
    reference_images,
    running_app,
    server_process,
)

pytestmark = pytest.mark.anyio

DEVICES = ("cpu:0", "cpu:1")  # the metrics' labels of CM_DEVICES=cpu,cpu


class Gate:
    """Holds evaluations while closed, and counts those it holds (one per device at most)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._closed = False
        self._held = 0

    def close(self) -> None:
        with self._cond:
            self._closed = True

    def open(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()

    def pass_through(self) -> None:
        with self._cond:
            if not self._closed:
                return
            self._held += 1
            self._cond.notify_all()
            assert self._cond.wait_for(lambda: not self._closed, 60), "gate never opened"
            self._held -= 1

    def wait_held(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._held >= count, 30)


class DeviceEngine(Engine):
    """The real engine behind a gate; `fail_next` makes its next network call fail (a fault of its device)."""

    def __init__(self, *args: Any, gate: Gate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.fail_next = False

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.gate.pass_through()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected device fault")
        return super()._forward(x, sigma, labels)


def devices_app(checkpoint: Path, gate: Gate) -> tuple[Any, list[DeviceEngine]]:
    """Settings for CM_DEVICES=cpu,cpu and an engine factory that keeps the engines it makes (device order)."""
    engines: list[DeviceEngine] = []

    def factory(model: Any, **kwargs: Any) -> DeviceEngine:
        engines.append(DeviceEngine(model, gate=gate, **kwargs))
        return engines[-1]

    return (app_settings({"tiny": checkpoint}, devices=["cpu", "cpu"]), factory), engines


async def held_on_both(client: Any, gate: Gate, bodies: list[dict[str, Any]]) -> list[asyncio.Task]:
    """Post two requests so that each device holds one at the gate (the first device is busy with the first)."""
    gate.close()
    tasks = []
    for held, body in enumerate(bodies, start=1):
        tasks.append(asyncio.create_task(client.post("/v1/generate", json=body)))
        assert await asyncio.to_thread(gate.wait_held, held), f"no device took request {held}"
    return tasks


async def test_two_devices_give_the_images_of_one_and_both_evaluate(tiny_checkpoint: Path) -> None:
    gate = Gate()
    (settings, factory), engines = devices_app(tiny_checkpoint, gate)
    async with running_app(settings, factory) as (app, client):
        assert app.state.service.scheduler.devices == list(DEVICES)
        assert len(engines) == 2 and engines[0].model is not engines[1].model  # a copy of the model each
        bodies = [{"n": 2, "steps": 2, "seed": 7}, {"n": 3, "steps": 2, "seed": 7}]
        held = await held_on_both(client, gate, bodies)
        gate.open()
        loaded = [{"n": 1 + i % 3, "steps": 2, "seed": 7} for i in range(12)]  # then load, any device
        responses = await asyncio.gather(*held, *(client.post("/v1/generate", json=b) for b in loaded))
        samples = metric_samples((await client.get("/metrics")).text)
    expected = reference_images(tiny_checkpoint, 7, 3, [80.0, 0.821])
    for response in responses:
        assert response.status_code == 200, response.text
        for i, image in enumerate(response.json()["images"]):
            np.testing.assert_array_equal(decode_b64(image["b64"]), expected[i])
    for device in DEVICES:
        assert metric(samples, "cmserve_device_batch_size_count", model="tiny", device=device) > 0
    passes = metric(samples, "cmserve_forward_passes_total", model="tiny")
    assert passes == sum(metric(samples, "cmserve_device_forward_duration_seconds_count", model="tiny", device=d)
                         for d in DEVICES)


async def test_a_drain_lets_both_devices_finish(tiny_checkpoint: Path) -> None:
    gate = Gate()
    (settings, factory), _ = devices_app(tiny_checkpoint, gate)
    async with running_app(settings, factory) as (app, client):
        held = await held_on_both(client, gate, [{"seed": 1}, {"seed": 2}])
        app.state.service.begin_drain()
        refused = await client.post("/v1/generate", json={"seed": 3})
        gate.open()
        finished = await asyncio.gather(*held)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "draining"
    assert [r.status_code for r in finished] == [200, 200]
    assert all(not device.thread.is_alive() for device in app.state.service.scheduler._devices)


async def test_a_fault_on_one_device_fails_its_batch_and_serving_goes_on(tiny_checkpoint: Path) -> None:
    gate = Gate()
    (settings, factory), engines = devices_app(tiny_checkpoint, gate)
    async with running_app(settings, factory) as (_, client):
        engines[1].fail_next = True
        held = await held_on_both(client, gate, [{"seed": 1}, {"seed": 2}])  # device 0 takes the first
        gate.open()
        first, second = await asyncio.gather(*held)
        after = await asyncio.gather(*(client.post("/v1/generate", json={"seed": s}) for s in range(8)))
        samples = metric_samples((await client.get("/metrics")).text)
    assert first.status_code == 200
    assert second.status_code == 500 and second.json()["error"]["type"] == "internal"
    assert [r.status_code for r in after] == [200] * 8
    assert metric(samples, "cmserve_request_failures_total", model="tiny", reason="error") == 1


async def test_each_device_halves_its_batches_when_out_of_memory(tiny_checkpoint: Path) -> None:
    OOMAboveEngine.instances.clear()

    def factory(model: Any, **kwargs: Any) -> OOMAboveEngine:
        return OOMAboveEngine(model, limit=2, **kwargs)

    settings = app_settings({"tiny": tiny_checkpoint}, devices=["cpu", "cpu"])
    async with running_app(settings, factory) as (_, client):
        bodies = [{"n": 8, "steps": 2, "seed": 100}, *({"n": 3, "seed": s} for s in range(6))]
        responses = await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    expected = reference_images(tiny_checkpoint, 100, 8, [80.0, 0.821])
    for i, image in enumerate(responses[0].json()["images"]):
        np.testing.assert_array_equal(decode_b64(image["b64"]), expected[i])
    assert len(OOMAboveEngine.instances) == 2
    assert all(max(engine.sizes, default=0) <= 2 for engine in OOMAboveEngine.instances)
    assert sum(engine.oom_splits for engine in OOMAboveEngine.instances) > 0


def poll(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.005)
    raise AssertionError("condition never held")


def test_a_server_on_two_cpu_devices_serves_one_image_per_seed_and_drains_on_sigterm(tiny_checkpoint: Path) -> None:
    """`python -m service` with CM_DEVICES=cpu,cpu and one image per evaluation, so concurrent requests need both
    devices: every answer is the seed's image, both devices evaluate, and SIGTERM lets in-flight requests finish."""
    env = {"CM_MODELS": f"tiny={tiny_checkpoint}", "CM_DEVICES": "cpu,cpu", "CM_MAX_BATCH": "1",
           "CM_BATCH_BUCKETS": "1", "CM_DRAIN_S": "60"}
    sigmas = [80.0, 17.5, 2.5, 0.17]
    expected = reference_images(tiny_checkpoint, 11, 4, sigmas)
    with server_process(**env) as srv:
        assert "on cpu, cpu" in srv.wait_log(lambda r: str(r.get("msg", "")).startswith("model tiny ready"))["msg"]
        with srv.client() as client, ThreadPoolExecutor(6) as pool:
            body = {"n": 4, "sigmas": sigmas, "seed": 11}
            loaded = list(pool.map(lambda _: client.post("/v1/generate", json=body), range(6)))
            samples = srv.metrics()
            # In flight at SIGTERM: 6 × 16 × 8 one-image evaluations.
            bodies = [{"n": 16, "steps": 8, "seed": seed} for seed in range(6)]
            drained = [pool.submit(client.post, "/v1/generate", json=b) for b in bodies]
            poll(lambda: httpx.get(srv.url + "/v1/stats").json()["in_progress"] == 6)
            srv.proc.send_signal(signal.SIGTERM)
            finished = [f.result(timeout=120) for f in drained]
        assert srv.proc.wait(60) == 0, srv.tail()
    for response in loaded:
        assert response.status_code == 200, response.text
        for i, image in enumerate(response.json()["images"]):
            np.testing.assert_array_equal(decode_b64(image["b64"]), expected[i])
    for device in DEVICES:
        assert metric(samples, "cmserve_device_batch_size_count", model="tiny", device=device) > 0
    assert [r.status_code for r in finished] == [200] * 6
    assert all(len(r.json()["images"]) == 16 for r in finished)
