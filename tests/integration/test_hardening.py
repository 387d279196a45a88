"""Issue 20's hardening rows, each over a real socket to `python -m service`, on both request paths.

One server answers POST /v1/generate in its HTTP protocol (CM_PROTOCOL_FAST_PATH=true), the other through
FastAPI's route; both run service/api/protocol.py's ServiceProtocol, which caps the request head (431) and
times out requests that do not arrive (408). One image per evaluation, so that a large request stays in flight.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from models import checkpoint
from models.consistency import ConsistencyModel
from service.schemas import MAX_SEED, GenerateResponse
from tests.conftest import randomize
from tests.integration.conftest import (
    REPO,
    TINY,
    ServerProcess,
    app_settings,
    metric,
    running_app,
    server_env,
    server_process,
)

READ_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 5  # uvicorn's timeout_keep_alive
SETTINGS = {"CM_MAX_BATCH": "1", "CM_BATCH_BUCKETS": "1", "CM_MAX_QUEUE": "256",
            "CM_READ_TIMEOUT_S": str(READ_TIMEOUT_S)}
PATHS = ("protocol", "asgi")


@pytest.fixture(scope="module", params=PATHS)
def server(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """One server per request path (pytest runs each one's tests together)."""
    fast = str(request.param == "protocol").lower()
    with server_process(CM_MODELS=f"tiny={tiny_checkpoint}", CM_PROTOCOL_FAST_PATH=fast, **SETTINGS) as proc:
        yield proc


def generate(body: bytes, extra: bytes = b"", length: int | None = None) -> bytes:
    return (b"POST /v1/generate HTTP/1.1\r\nHost: cmserve\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (len(body) if length is None else length, extra, body))


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_until_closed(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def parse(response: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return int(status.split(b" ")[1]), dict(line.lower().split(b": ", 1) for line in lines), body


def send_all(sock: socket.socket, chunks: Iterator[bytes]) -> int:
    """Send until the server stops reading (it refused); the bytes sent."""
    sent = 0
    try:
        for chunk in chunks:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


# ---------------------------------------------------------------------- headers: 431, bounded memory


@pytest.mark.parametrize("extra", [b"X-Pad: " + b"x" * 20_000 + b"\r\n",
                                   b"".join(b"X-Pad-%d: x\r\n" % i for i in range(120))],
                         ids=["16 KiB in all", "100 headers"])
def test_a_head_over_the_caps_gets_431_naming_the_setting_and_the_connection_closes(
        server: ServerProcess, extra: bytes) -> None:
    with connect(server) as sock:
        sock.sendall(generate(b'{"seed": 1}', extra))
        status, headers, body = parse(read_until_closed(sock))
    assert status == 431 and headers[b"connection"] == b"close"
    error = json.loads(body)["error"]
    assert error["type"] == "headers_too_large"
    assert ("CM_MAX_HEADER_BYTES" if len(extra) > 10_000 else "CM_MAX_HEADERS") in error["message"]


@pytest.mark.parametrize("line", [b"X-Pad: " + b"x" * 65536, b"X-A: b\r\n" * 8192], ids=["one line", "many"])
def test_16_mib_of_headers_are_refused_without_keeping_them(server: ServerProcess, line: bytes) -> None:
    """Formerly accepted, with 247 MB of RSS that stayed."""
    before = server.rss_bytes()
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: cmserve\r\n")
        send_all(sock, (line for _ in range(16 * 2**20 // len(line))))  # read and dropped after the refusal
        response = read_until_closed(sock)
    assert not response or parse(response)[0] == 431  # (a reset can beat the answer when the client sends on)
    assert server.rss_bytes() - before < 8 * 2**20
    assert httpx.get(server.url + "/healthz").status_code == 200


# ---------------------------------------------------------------------- read timeout: 408, idle connections


def test_a_head_sent_slowly_then_a_pause_gets_408_and_the_connection_closes(server: ServerProcess) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: cmserve\r\n")
        time.sleep(0.3)
        sock.sendall(b"Content-Type: application/json\r\n")  # then nothing
        status, headers, body = parse(read_until_closed(sock))
        waited = time.monotonic() - started
    assert status == 408 and headers[b"connection"] == b"close"
    assert json.loads(body)["error"]["type"] == "request_timeout"
    assert READ_TIMEOUT_S <= waited < READ_TIMEOUT_S + 2  # checked twice a second


def test_a_body_sent_slowly_then_a_pause_gets_408_from_the_handler_and_the_connection_closes(
        server: ServerProcess) -> None:
    body = b'{"n": 1, "seed": 5}'
    with connect(server) as sock:
        sock.sendall(generate(body[:8], b"X-Request-ID: slow-body-%s\r\n" % server.url[-5:].encode(), len(body)))
        status, headers, reply = parse(read_until_closed(sock))
    assert status == 408 and headers[b"connection"] == b"close"
    error = json.loads(reply)["error"]
    assert error["type"] == "request_timeout" and "CM_READ_TIMEOUT_S" in error["message"]
    line = server.wait_log(lambda r: r.get("request_id") == "slow-body-" + server.url[-5:], timeout=10)
    assert line["status"] == 408


def test_a_new_connection_that_sends_nothing_is_closed(server: ServerProcess) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - started < READ_TIMEOUT_S + 2


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(server: ServerProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: cmserve\r\n\r\n")
        started = time.monotonic()
        response = read_until_closed(sock)
        assert parse(response)[0] == 200
        assert time.monotonic() - started < KEEP_ALIVE_S + 2


# ---------------------------------------------------------------------- Accept


def test_a_4_mib_accept_header_is_refused_at_once_and_blocks_no_one(server: ServerProcess) -> None:
    """Formerly 1.1 s of blocked event loop and a 406 that echoed the header."""
    accept = b"Accept: " + b", ".join(b"text/x-%d" % i for i in range(400_000)) + b"\r\n"  # > 4 MiB
    others: list[float] = []

    def probe() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(10):
                started = time.monotonic()
                client.get("/healthz")
                others.append(time.monotonic() - started)

    thread = threading.Thread(target=probe)
    with connect(server) as sock:
        thread.start()
        send_all(sock, iter([generate(b"{}", accept)]))
        response = read_until_closed(sock)
    thread.join()
    assert parse(response)[0] == 431 if response else True  # or reset while it still sent: never a 406 echo
    assert max(others) < 0.5


def test_an_accept_header_of_many_ranges_gets_a_bounded_406(server: ServerProcess) -> None:
    accept = ", ".join(f"text/x-{i}" for i in range(1000))  # 13 KiB, under the head cap
    response = httpx.post(server.url + "/v1/generate", json={}, headers={"Accept": accept}, timeout=30)
    assert response.status_code == 406 and len(response.content) < 1024


# ---------------------------------------------------------------------- seeds


def test_a_seed_whose_last_image_passes_the_range_is_a_422_naming_seed(server: ServerProcess) -> None:
    refused = httpx.post(server.url + "/v1/generate", json={"seed": MAX_SEED, "n": 2}, timeout=30)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "seed"
    served = httpx.post(server.url + "/v1/generate", json={"seed": MAX_SEED - 1, "n": 2}, timeout=30)
    doc = GenerateResponse.model_validate(served.json())
    assert [image.seed for image in doc.images] == [MAX_SEED - 1, MAX_SEED]


# ---------------------------------------------------------------------- class labels


@pytest.fixture(scope="module")
def unnamed_classes_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional model without class names: class_label "7" is the index 7."""
    torch.manual_seed(2)
    model = randomize(ConsistencyModel.from_config(TINY), seed=5)
    return checkpoint.save(tmp_path_factory.mktemp("models") / "unnamed.safetensors", model)


@pytest.mark.anyio
async def test_a_class_label_of_unicode_digits_is_a_422_naming_the_field(unnamed_classes_checkpoint: Path) -> None:
    """Formerly a 500: int() of a Unicode digit that str.isdigit accepts."""
    async with running_app(app_settings({"plain": unnamed_classes_checkpoint}, trace=False)) as (_, client):
        for label in ("²", "①", "٣", "10", "-1", " 7"):
            response = await client.post("/v1/generate", json={"class_label": label, "seed": 1})
            assert response.status_code == 422, (label, response.text)
            assert response.json()["error"]["field"] == "class_label"
        response = await client.post("/v1/generate", json={"class_label": "7", "seed": 1})
        assert response.status_code == 200 and response.json()["images"][0]["class_label"] == 7


# ---------------------------------------------------------------------- pipelined disconnect


def test_a_client_that_leaves_with_requests_pipelined_behind_a_long_one_has_its_jobs_cancelled(
        server: ServerProcess) -> None:
    """Formerly uvicorn told only the newest (queued) request; the long one ran to completion."""
    before = server.metrics()
    evaluated_before = metric(before, "cmserve_batch_size_sum", model="tiny")
    cancelled_before = metric(before, "cmserve_request_failures_total", model="tiny", reason="cancelled")
    long = generate(json.dumps({"n": 64, "steps": 8, "seed": 9}).encode())
    sock = connect(server)
    sock.sendall(long + generate(b'{"n": 4, "steps": 8}') + b"GET /healthz HTTP/1.1\r\nHost: cmserve\r\n\r\n")
    deadline = time.monotonic() + 30
    while metric(server.metrics(), "cmserve_batch_size_sum", model="tiny") <= evaluated_before:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()

    def settled() -> dict[Any, float] | None:
        samples = server.metrics()
        done = metric(samples, "cmserve_request_failures_total", model="tiny", reason="cancelled") > cancelled_before
        return samples if done and metric(samples, "cmserve_requests_in_progress") == 0 else None

    while (samples := settled()) is None:
        assert time.monotonic() < deadline, "the long request was never cancelled"
        time.sleep(0.01)
    assert metric(samples, "cmserve_queue_depth", model="tiny") == 0
    assert metric(samples, "cmserve_batch_size_sum", model="tiny") - evaluated_before < 64 * 8


# ---------------------------------------------------------------------- config file


def test_an_api_key_that_runs_onto_a_second_line_of_the_config_file_is_never_logged(tmp_path: Path) -> None:
    config = tmp_path / "cmserve.env"
    config.write_text("CM_API_KEYS=first-secret-0123456789,\nsecond-secret-0123456789\n")
    result = subprocess.run([sys.executable, "-m", "service", "--config", str(config)], cwd=REPO, env=server_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "cmserve.env:2" in output and "secret" not in output
