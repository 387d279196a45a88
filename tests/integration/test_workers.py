"""CM_WORKERS > 1: several `python -m service` worker processes on one port (service/server.py).

Both workers answer, with the same images for the same seeds; /metrics and /v1/stats of any worker add up
all of them; a worker that dies is replaced while the other keeps serving; SIGTERM drains every worker and
exits 0; killing the parent outright takes the workers with it; a worker that cannot load stops it all.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.schemas import GenerateResponse
from tests.integration.conftest import ServerProcess, decode_b64, metric, reference_images, server_process

WORKERS = 2


def start_workers(checkpoint: Path, **settings: str) -> Any:
    base = {"CM_MODELS": f"tiny={checkpoint}", "CM_WORKERS": str(WORKERS), "CM_MAX_BATCH": "8",
            "CM_BATCH_BUCKETS": "1,2,4,8"}
    return server_process(**{**base, **settings})


def wait_all_ready(srv: ServerProcess, count: int = WORKERS) -> None:
    deadline = time.monotonic() + 120
    while sum(str(r.get("msg", "")).startswith("ready: serving") for r in list(srv.logs)) < count:
        assert time.monotonic() < deadline and srv.proc.poll() is None, srv.tail()
        time.sleep(0.05)


def worker_pids(srv: ServerProcess) -> dict[int, int]:
    """Worker index -> pid of its latest process, from the parent's "worker started" lines."""
    return {r["worker"]: r["pid"] for r in list(srv.logs) if r.get("msg") == "worker started"}


def served_by(srv: ServerProcess, request_id: str) -> int:
    record = srv.wait_log(lambda r: r.get("request_id") == request_id, timeout=30)
    return record["worker"]


def generate(srv: ServerProcess, **body: Any) -> httpx.Response:
    """One request on a new connection (each connection lands on one worker's socket)."""
    with srv.client() as client:
        return client.post("/v1/generate", json=body)


@pytest.fixture(scope="module")
def workers(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    with start_workers(tiny_checkpoint) as srv:
        wait_all_ready(srv)
        yield srv


def test_every_worker_serves_and_the_same_seed_gives_the_same_image(workers: ServerProcess,
                                                                   tiny_checkpoint: Path) -> None:
    expected = reference_images(tiny_checkpoint, 42, 3, [80.0])
    seen: set[int] = set()
    for attempt in range(60):  # new connections until both workers have answered (the kernel hashes them)
        response = generate(workers, n=3, seed=42, steps=1)
        assert response.status_code == 200, response.text
        for i, image in enumerate(GenerateResponse.model_validate(response.json()).images):
            assert (decode_b64(image.b64) == expected[i]).all(), f"attempt {attempt}, image {i}"
        seen.add(served_by(workers, response.headers["x-request-id"]))
        if seen == set(range(WORKERS)):
            break
    assert seen == set(range(WORKERS))


def test_each_worker_runs_on_its_own_share_of_the_cpus(workers: ServerProcess) -> None:
    cpus = sorted(os.sched_getaffinity(0))  # the server inherited this process's CPUs
    masks = {index: sorted(os.sched_getaffinity(pid)) for index, pid in worker_pids(workers).items()}
    if len(cpus) < WORKERS:  # fewer CPUs than workers: nothing to split
        assert all(mask == cpus for mask in masks.values())
        return
    assert sorted(cpu for mask in masks.values() for cpu in mask) == cpus  # disjoint, and every CPU used
    assert all(abs(len(masks[0]) - len(mask)) <= 1 for mask in masks.values())
    for index, mask in masks.items():
        workers.wait_log(lambda r, i=index, m=mask: r.get("worker") == i and r.get("cpus") == m)


def test_metrics_and_stats_add_up_over_workers(workers: ServerProcess) -> None:
    before = metric(workers.metrics(), "cmserve_requests_total", model="tiny", code="200")
    images_before = metric(workers.metrics(), "cmserve_images_generated_total", model="tiny")
    for seed in range(12):
        assert generate(workers, n=2, seed=seed).status_code == 200
    for _ in range(4):  # whichever worker answers the scrape reports every worker's counts
        samples = workers.metrics()
        assert metric(samples, "cmserve_requests_total", model="tiny", code="200") == before + 12
        assert metric(samples, "cmserve_images_generated_total", model="tiny") == images_before + 24
        assert metric(samples, "cmserve_ready") == 1
        assert metric(samples, "cmserve_requests_in_progress") == 0
        assert metric(samples, "cmserve_build_info", version="0.1.0") == 1
        assert not any(name.startswith("process_") for name, _ in samples)  # per-process: not summed
    stats = httpx.get(workers.url + "/v1/stats").json()
    assert stats["ready"] is True and stats["in_progress"] == 0 and stats["mean_images_per_forward"] >= 1


def test_under_load_every_access_line_arrives_whole_and_once(workers: ServerProcess) -> None:
    """Both workers write batches of lines to one stderr pipe: none may interleave within another's line."""
    ids = [f"load-{i:03d}-" + "x" * 110 for i in range(240)]  # long ids: a loop iteration's lines pass 4 KiB

    def client(chunk: list[str]) -> None:
        with workers.client() as http:
            for request_id in chunk:
                response = http.post("/v1/generate", json={"n": 1}, headers={"X-Request-ID": request_id})
                assert response.status_code == 200, response.text

    threads = [threading.Thread(target=client, args=(ids[i::24],)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    workers.wait_log(lambda r: r.get("request_id") == ids[-1], timeout=30)
    deadline = time.monotonic() + 30
    while True:
        raw = [line for line in list(workers.raw) if "load-" in line]
        seen = [r["request_id"] for r in list(workers.logs) if str(r.get("request_id", "")).startswith("load-")]
        if sorted(seen) == sorted(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(raw) == len(ids)  # every line that mentions a request parsed as one JSON record
    assert sorted(seen) == sorted(ids)
    assert {r["worker"] for r in list(workers.logs) if str(r.get("request_id", "")).startswith("load-")} == {0, 1}


def test_a_worker_that_dies_is_replaced_and_the_other_keeps_serving(workers: ServerProcess) -> None:
    old = worker_pids(workers)
    os.kill(old[0], signal.SIGKILL)
    workers.wait_log(lambda r: r.get("msg") == "worker died; starting a replacement" and r.get("pid") == old[0])
    wait_all_ready(workers, WORKERS + 1)
    assert worker_pids(workers)[0] != old[0] and worker_pids(workers)[1] == old[1]
    for seed in range(6):
        assert generate(workers, seed=seed).status_code == 200
    assert metric(workers.metrics(), "cmserve_ready") == 1  # the dead worker's gauge left the totals


def test_sigterm_drains_every_worker_and_exits_zero(tiny_checkpoint: Path) -> None:
    with start_workers(tiny_checkpoint, CM_MAX_BATCH="1", CM_BATCH_BUCKETS="1", CM_DRAIN_S="60") as srv:
        wait_all_ready(srv)
        results: list[httpx.Response | Exception] = []

        def slow(seed: int) -> None:
            try:
                results.append(generate(srv, n=64, steps=8, seed=seed))
            except httpx.HTTPError as e:
                results.append(e)

        threads = [threading.Thread(target=slow, args=(seed,)) for seed in range(0, 800, 100)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/v1/stats").json()["in_progress"] < len(threads):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(180)
        assert srv.proc.wait(60) == 0, srv.tail()
        assert [getattr(r, "status_code", r) for r in results] == [200] * len(threads), srv.tail()
        for response in results:
            assert isinstance(response, httpx.Response)
            assert len(GenerateResponse.model_validate(response.json()).images) == 64  # whole, untruncated
        ids = {r.headers["x-request-id"] for r in results if isinstance(r, httpx.Response)}
        for request_id in ids:
            served_by(srv, request_id)  # its access line has been read
        logs = list(srv.logs)
        drained = {r["worker"]: (i, int(r["msg"].split()[1])) for i, r in enumerate(logs)
                   if str(r.get("msg", "")).startswith("draining:")}
        assert set(drained) == set(range(WORKERS))  # every worker drained
        # ... the requests it held when the signal reached it: those it answered after its "draining" line (the
        # signal takes up to two 0.1 s ticks to arrive, and a request may finish meanwhile)
        held = {w: sum(1 for r in logs[i:] if r.get("worker") == w and r.get("request_id") in ids)
                for w, (i, _) in drained.items()}
        assert all(drained[w][1] >= held[w] for w in held), (drained, held)
        assert sum(held.values()) >= 1  # the signal came while requests were in flight


def test_killing_the_parent_takes_the_workers_with_it(tiny_checkpoint: Path) -> None:
    with start_workers(tiny_checkpoint, CM_CPU_AFFINITY="false") as srv:
        wait_all_ready(srv)
        pids = list(worker_pids(srv).values())
        assert all(os.sched_getaffinity(pid) == os.sched_getaffinity(0) for pid in pids)  # not pinned
        port = srv.port
        srv.proc.kill()
        srv.proc.wait(30)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "workers outlived their parent"
            time.sleep(0.05)
        with socket.socket() as s:  # and the port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def test_a_worker_that_cannot_load_its_model_stops_the_server(tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with server_process(wait_ready=False, CM_MODELS=f"b={broken}", CM_WORKERS="2") as srv:
        assert srv.proc.wait(120) == 1, srv.tail()
        srv.wait_log(lambda r: r.get("msg") == "worker ended and will not be replaced; stopping the server")


def test_workers_refuse_a_gpu_device() -> None:
    with server_process(wait_ready=False, CM_WORKERS="2", CM_DEVICE="cuda") as srv:
        assert srv.proc.wait(60) == 2
        assert "CM_WORKERS=2 needs CM_DEVICE=cpu" in srv.wait_log(lambda r: r.get("level") == "error")["msg"]
