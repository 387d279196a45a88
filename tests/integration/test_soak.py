"""Reliability 14, soak: a real `python -m service` process under a fixed concurrency for a fixed time →
zero unexpected 5xx, every request that was not abandoned answered, and RSS growth under 5%.

The load mixes what clients do: JSON and raw images, n and steps of several sizes, every format, requests
that must be refused (404, 406, 422, and 431 for a head over CM_MAX_HEADER_BYTES), clients that leave
mid-body (the server counts a 499), with probes and scrapes beside them. The server's RSS
(/proc/PID/status VmRSS) is read after a warm-up and again at the end. The default run is short
(CM_SOAK_S seconds, default 20, at concurrency 8); `-m slow` runs issue 20's long one (CM_SOAK_LONG_S,
default 600 s, at CM_SOAK_CONCURRENCY, default 64).
"""

from __future__ import annotations

import base64
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from service.schemas import ErrorResponse, GenerateResponse
from tests.integration.conftest import ServerProcess, decode, metric, server_process

SOAK_S = float(os.environ.get("CM_SOAK_S", "20"))
LONG_SOAK_S = float(os.environ.get("CM_SOAK_LONG_S", "600"))
LONG_CONCURRENCY = int(os.environ.get("CM_SOAK_CONCURRENCY", "64"))
WARMUP_S = 3.0
CONCURRENCY = 8
MAX_RSS_GROWTH = 0.05  # of the RSS after the warm-up (issue 20); Triton's L0_memory_growth allows 100 MB
LEAVE = "leave"  # the path of a call whose client sends half a body and hangs up (no answer to read)
PROBE = {"n": 1, "steps": 2, "seed": 77, "class_label": 5}  # the same image before and after the soak


@dataclass(frozen=True)
class Call:
    """One request of the mix and the status it must get."""

    method: str
    path: str
    expect: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def request_mix(rng: random.Random) -> Call:
    roll = rng.random()
    if roll < 0.70:
        formats = ["png", "jpeg", "webp"]
        body = {"n": rng.choice([1, 1, 2, 4]), "steps": rng.choice([1, 2, 4]), "format": rng.choice(formats)}
        if rng.random() < 0.5:
            body["seed"] = rng.randrange(2**63)
        if rng.random() < 0.3:
            body["class_label"] = rng.randrange(10)
        return Call("POST", "/v1/generate", 200, body)
    if roll < 0.80:
        return Call("POST", "/v1/generate", 200, {"steps": rng.choice([1, 2])}, {"Accept": "image/png"})
    if roll < 0.84:
        return Call("POST", "/v1/generate", 404, {"model": "nope"})
    if roll < 0.88:
        return Call("POST", "/v1/generate", 422, {"n": 0})
    if roll < 0.90:
        return Call("POST", "/v1/generate", 406, {"n": 2}, {"Accept": "image/png"})
    if roll < 0.91:
        return Call("POST", "/v1/generate", 431, {"n": 1}, {"X-Pad": "x" * 20_000})
    if roll < 0.93:
        return Call("POST", LEAVE, 499, {"n": 4, "steps": 4})
    return Call("GET", rng.choice(["/healthz", "/readyz", "/metrics", "/v1/models", "/v1/stats"]), 200)


def check(call: Call, response: httpx.Response) -> str | None:
    """What is wrong with this response, or None."""
    if response.status_code != call.expect:
        return f"{call.method} {call.path} {call.body} -> {response.status_code} (expected {call.expect}): " \
               f"{response.text[:300]}"
    if call.path != "/v1/generate":
        return None
    if call.expect != 200:
        ErrorResponse.model_validate(response.json())
    elif call.headers.get("Accept") == "image/png":
        assert decode(response.content).shape == (8, 8, 1)
    else:
        doc = GenerateResponse.model_validate(response.json())
        assert len(doc.images) == call.body["n"] and len(doc.sigmas) == call.body["steps"]  # type: ignore[index]
        assert all(base64.b64decode(image.b64) for image in doc.images)
    return None


@dataclass
class Tally:
    codes: Counter[int] = field(default_factory=Counter)  # status codes of generate requests
    calls: int = 0
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, call: Call, status: int | None, problem: str | None) -> None:
        with self.lock:
            self.calls += 1
            if status is not None and call.path in ("/v1/generate", LEAVE) and status != 431:  # 431: no handler
                self.codes[status] += 1
            if problem is not None and len(self.problems) < 20:
                self.problems.append(problem)


def leave_mid_body(server: ServerProcess, body: dict[str, Any]) -> None:
    """Send the headers and half the body, then hang up: the server must drop the request (499)."""
    data = orjson.dumps(body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data[: len(data) // 2]))


def load(server: ServerProcess, seconds: float, seed: int, concurrency: int = CONCURRENCY) -> Tally:
    """`concurrency` closed-loop clients (one keep-alive connection each) for `seconds`."""
    tally = Tally()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        http = server.client()
        while time.monotonic() < stop:
            call = request_mix(rng)
            if call.path == LEAVE:
                leave_mid_body(server, call.body)  # type: ignore[arg-type]
                tally.add(call, call.expect, None)
                continue
            try:
                response = http.request(call.method, call.path, json=call.body, headers=call.headers)
            except httpx.HTTPError as e:
                tally.add(call, None, f"{call.method} {call.path} {call.body}: {type(e).__name__}: {e}")
                continue
            try:
                problem = check(call, response)
            except (AssertionError, ValueError) as e:
                problem = f"{call.method} {call.path} {call.body}: bad response ({e}): {response.text[:300]}"
            tally.add(call, response.status_code, problem)
            if response.status_code == 431:  # the server closed that connection
                http.close()
                http = server.client()
        http.close()

    threads = [threading.Thread(target=client, args=(i,), name=f"soak-client-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally


def generate_counts(server: ServerProcess) -> Counter[int]:
    """cmserve_requests_total summed over models, by status code."""
    counts: Counter[int] = Counter()
    for (name, labels), value in server.metrics().items():
        if name == "cmserve_requests_total":
            counts[int(dict(labels)["code"])] += int(value)
    return counts


def probe_image(server: ServerProcess) -> bytes:
    response = httpx.post(server.url + "/v1/generate", json=PROBE, timeout=60)
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["images"][0]["b64"])


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    with server_process(CM_MODELS=f"tiny={tiny_checkpoint}", CM_MAX_BATCH="8", CM_BATCH_BUCKETS="1,2,4,8") as proc:
        yield proc


def soak(server: ServerProcess, seconds: float, report: Callable[[str], None], concurrency: int = CONCURRENCY) -> None:
    before_image = probe_image(server)
    warm = load(server, WARMUP_S, seed=0)  # every path, format and batch size allocated once
    assert not warm.problems, "\n".join(warm.problems)
    rss_before, counts_before = server.rss_bytes(), generate_counts(server)

    tally = load(server, seconds, seed=1, concurrency=concurrency)

    deadline = time.monotonic() + 10  # a client that left last may still be counted (499)
    while (counts_after := generate_counts(server)) - counts_before != tally.codes and time.monotonic() < deadline:
        time.sleep(0.05)
    rss_after = server.rss_bytes()
    growth = rss_after - rss_before
    report(f"soak {seconds:g} s x {concurrency} clients: {tally.calls} calls, generate codes {dict(tally.codes)}, "
           f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
    assert not tally.problems, f"{len(tally.problems)}+ unexpected responses:\n" + "\n".join(tally.problems)
    assert tally.codes[200] > 0 and tally.codes[404] > 0 and tally.codes[422] > 0, tally.codes
    assert not any(500 <= code < 600 for code in tally.codes)
    assert counts_after - counts_before == tally.codes, "the server's request counts disagree with the clients'"
    allowed = MAX_RSS_GROWTH * rss_before
    assert growth < allowed, f"server RSS grew by {growth / 2**20:.1f} MiB (allowed {allowed / 2**20:.1f})"
    samples = server.metrics()
    assert metric(samples, "cmserve_requests_in_progress") == 0 and metric(samples, "cmserve_ready") == 1
    assert metric(samples, "cmserve_queue_depth", model="tiny") == 0
    assert probe_image(server) == before_image, "the same seed gave another image after the soak"
    assert server.proc.poll() is None, server.tail()


@pytest.mark.timeout(SOAK_S + 240)
def test_soak_no_5xx_and_bounded_memory(server: ServerProcess) -> None:
    soak(server, SOAK_S, report=lambda line: print(line))


@pytest.mark.slow
@pytest.mark.timeout(LONG_SOAK_S + 300)
def test_long_soak_no_5xx_and_bounded_memory(server: ServerProcess) -> None:
    soak(server, LONG_SOAK_S, report=lambda line: print(line), concurrency=LONG_CONCURRENCY)
