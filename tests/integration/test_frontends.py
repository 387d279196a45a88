"""CM_FRONTENDS > 1: front-end processes on one port in front of one engine process (service/server.py,
service/frontend.py, service/enginehost.py), as a real `python -m service`.

The same images as one process; requests of different front ends share evaluations; the engine's refusals,
deadlines and cancels reach the clients; one /metrics for the whole server; a dead front end is replaced; SIGTERM
drains and exits 0; the engine process dying stops the server.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from models.editing import inpainting
from service.api.edit import to_tensor
from tests.integration.conftest import ServerProcess, decode_b64, metric, reference_images, server_process
from tests.integration.test_edit import TWO, digit, offline_edit, png_b64
from tests.integration.test_workers import served_by, wait_all_ready, worker_pids

FRONTENDS = 2


def start_frontends(checkpoint: Path, **settings: str) -> Any:
    base = {"CM_MODELS": f"tiny={checkpoint}", "CM_FRONTENDS": str(FRONTENDS), "CM_MAX_BATCH": "8",
            "CM_BATCH_BUCKETS": "1,2,4,8", "CM_DEVICE": "cpu", "CM_MAX_QUEUE": "16", "CM_DRAIN_S": "30"}
    return server_process(**{**base, **settings})


def wait_ready(srv: ServerProcess, count: int = FRONTENDS + 1) -> None:
    """The engine process and every front end logged "ready: serving"."""
    wait_all_ready(srv, count)


def engine_pid(srv: ServerProcess) -> int:
    return srv.wait_log(lambda r: r.get("msg") == "engine process started")["pid"]


def clients_by_frontend(srv: ServerProcess) -> dict[int, httpx.Client]:
    """One kept-alive client per front end (a connection stays with the front end that accepted it)."""
    found: dict[int, httpx.Client] = {}
    for _ in range(60):
        client = srv.client()
        response = client.post("/v1/generate", json={"seed": 1})
        assert response.status_code == 200, response.text
        index = served_by(srv, response.headers["x-request-id"])
        if index in found:
            client.close()
        else:
            found[index] = client
        if len(found) == FRONTENDS:
            return found
    raise AssertionError(f"only front ends {sorted(found)} answered")


@pytest.fixture(scope="module")
def frontends(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    with start_frontends(tiny_checkpoint, CM_MAX_WAIT_MS="50") as srv:
        wait_ready(srv)
        yield srv


def test_every_front_end_gives_the_single_process_images(frontends: ServerProcess, tiny_checkpoint: Path) -> None:
    expected = reference_images(tiny_checkpoint, 42, 3, [80.0])
    y = digit(1)
    omega = torch.zeros(8, 8)
    omega[4:] = 1
    edited = offline_edit(tiny_checkpoint, inpainting(to_tensor(y), omega), 10, 3, TWO, 7)
    edit = {"task": "inpaint", "image": png_b64(y), "box": [0, 4, 8, 8], "n": 3, "seed": 10, "steps": 2,
            "class_label": 7}
    clients = clients_by_frontend(frontends)
    for client in clients.values():
        response = client.post("/v1/generate", json={"n": 3, "seed": 42, "steps": 1})
        assert response.status_code == 200, response.text
        for i, image in enumerate(response.json()["images"]):
            assert (decode_b64(image["b64"]) == expected[i]).all()
        response = client.post("/v1/edit", json=edit)
        assert response.status_code == 200, response.text
        out = np.stack([decode_b64(image["b64"]) for image in response.json()["images"]])
        np.testing.assert_array_equal(out, edited)
        client.close()


def test_requests_of_two_front_ends_share_evaluations(frontends: ServerProcess) -> None:
    clients = clients_by_frontend(frontends)
    before = frontends.metrics()
    barrier = threading.Barrier(FRONTENDS)
    codes: list[int] = []

    def send(client: httpx.Client, seed: int) -> None:
        for round_ in range(5):
            barrier.wait(30)
            codes.append(client.post("/v1/generate", json={"n": 4, "steps": 8, "seed": seed + round_}).status_code)

    threads = [threading.Thread(target=send, args=(c, 100 * i)) for i, c in enumerate(clients.values())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for client in clients.values():
        client.close()
    assert codes == [200] * 10
    after = frontends.metrics()
    count = metric(after, "cmserve_batch_size_count", model="tiny") - metric(before, "cmserve_batch_size_count",
                                                                            model="tiny")
    images = metric(after, "cmserve_batch_size_sum", model="tiny") - metric(before, "cmserve_batch_size_sum",
                                                                          model="tiny")
    assert images == 10 * 4 * 8
    assert images / count > 4  # alone, each request's evaluations hold its 4 images: more means shared


def test_a_full_queue_is_503_with_retry_after(frontends: ServerProcess) -> None:
    with frontends.client() as client:
        response = client.post("/v1/generate", json={"n": 17})
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert "CM_MAX_QUEUE" in response.json()["error"]["message"]


def test_metrics_are_the_whole_servers(frontends: ServerProcess) -> None:
    before = frontends.metrics()
    for seed in range(8):  # new connections: both front ends answer some
        with frontends.client() as client:
            assert client.post("/v1/generate", json={"n": 2, "seed": seed}).status_code == 200
    for _ in range(4):  # whichever front end answers the scrape reports every process
        samples = frontends.metrics()
        assert metric(samples, "cmserve_requests_total", model="tiny", code="200") == metric(
            before, "cmserve_requests_total", model="tiny", code="200") + 8
        assert metric(samples, "cmserve_images_generated_total", model="tiny") == metric(
            before, "cmserve_images_generated_total", model="tiny") + 16  # counted by the engine process
        assert metric(samples, "cmserve_ready") == 1
        assert metric(samples, "cmserve_requests_in_progress") == 0
        assert not any(name.startswith("process_") for name, _ in samples)


def test_a_front_end_that_dies_is_replaced_and_the_other_keeps_serving(frontends: ServerProcess) -> None:
    old = worker_pids(frontends)
    engine = engine_pid(frontends)
    os.kill(old[0], signal.SIGKILL)
    frontends.wait_log(lambda r: r.get("msg") == "worker died; starting a replacement" and r.get("pid") == old[0])
    wait_ready(frontends, FRONTENDS + 2)
    assert worker_pids(frontends)[0] != old[0] and worker_pids(frontends)[1] == old[1]
    assert engine_pid(frontends) == engine and frontends.proc.poll() is None
    for seed in range(6):
        with frontends.client() as client:
            assert client.post("/v1/generate", json={"seed": seed}).status_code == 200
    assert metric(frontends.metrics(), "cmserve_ready") == 1


def test_deadline_disconnect_and_sigterm_drain(tiny_checkpoint: Path) -> None:
    """One evaluation per image step (CM_MAX_BATCH=1), so a 64-image 64-step request takes 4096 evaluations."""
    with start_frontends(tiny_checkpoint, CM_MAX_BATCH="1", CM_BATCH_BUCKETS="1", CM_MAX_QUEUE="4096",
                         CM_MAX_STEPS="64", CM_REQUEST_TIMEOUT_S="1") as srv:
        wait_ready(srv)
        passes = lambda: metric(srv.metrics(), "cmserve_forward_passes_total", model="tiny")  # noqa: E731
        # deadline: the engine drops the rest; 504
        before = passes()
        with srv.client() as client:
            response = client.post("/v1/generate", json={"n": 64, "steps": 64})
        assert response.status_code == 504, response.text[:300]
        time.sleep(0.3)
        assert passes() - before < 64 * 64
        # disconnect: the front end cancels; the engine drops its images
        cancelled = metric(srv.metrics(), "cmserve_request_failures_total", model="tiny", reason="cancelled")
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=srv.url, timeout=0.2) as client:
            client.post("/v1/generate", json={"n": 64, "steps": 64})
        deadline = time.monotonic() + 10
        while metric(srv.metrics(), "cmserve_request_failures_total", model="tiny", reason="cancelled") == cancelled:
            assert time.monotonic() < deadline, srv.tail()
            time.sleep(0.05)
        deadline = time.monotonic() + 10  # the engine process writes its queue gauge every LIVE_REFRESH_S
        while metric(srv.metrics(), "cmserve_queue_depth", model="tiny") != 0:
            assert time.monotonic() < deadline, srv.tail()
            time.sleep(0.05)
        settled = passes()
        time.sleep(0.3)
        assert passes() == settled
        # SIGTERM with requests in flight: they finish, then every process exits, 0
        results: list[Any] = []

        def slow(seed: int) -> None:
            try:
                with srv.client() as client:
                    results.append(client.post("/v1/generate", json={"n": 4, "steps": 64, "seed": seed}))
            except httpx.HTTPError as e:
                results.append(e)

        threads = [threading.Thread(target=slow, args=(seed,)) for seed in (0, 100)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/v1/stats").json()["in_progress"] < len(threads):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert srv.proc.wait(60) == 0, srv.tail()
        assert [getattr(r, "status_code", r) for r in results] == [200, 200], srv.tail()


def test_the_engine_process_dying_stops_the_server(tiny_checkpoint: Path) -> None:
    with start_frontends(tiny_checkpoint) as srv:
        wait_ready(srv)
        os.kill(engine_pid(srv), signal.SIGKILL)
        assert srv.proc.wait(60) == 1, srv.tail()
        srv.wait_log(lambda r: r.get("msg") == "the engine process ended; stopping the server")


def test_frontends_refuse_workers() -> None:
    with server_process(wait_ready=False, CM_WORKERS="2", CM_FRONTENDS="2") as srv:
        assert srv.proc.wait(60) == 2
        message = srv.wait_log(lambda r: r.get("level") == "error")["msg"]
        assert "CM_FRONTENDS=2" in message and "CM_WORKERS=2" in message
