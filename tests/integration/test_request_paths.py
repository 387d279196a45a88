"""The two entry points of POST /v1/generate answer alike, byte for byte where they can.

The same corpus of requests goes over a raw socket to a server with the HTTP protocol path
(service/api/protocol.py) and to one without it (CM_PROTOCOL_FAST_PATH=false: every request through FastAPI's
route). For each: the status line, the headers (but the date), the body (but `created` and `timings_ms`), the
access-log line (but its time fields) and what each counter of the metrics moved must be identical.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import ServerProcess, server_process

KEY = "test-key-0123456789abcdef"
COUNTERS = ("cmserve_requests_total", "cmserve_request_failures_total", "cmserve_images_generated_total",
            "cmserve_request_duration_seconds_count", "cmserve_encode_duration_seconds_count")
VARYING_LOG_FIELDS = ("ts", "duration_ms", "timings_ms")
SETTINGS = {"CM_MAX_BATCH": "8", "CM_BATCH_BUCKETS": "1,2,4,8", "CM_API_KEYS": KEY, "CM_MAX_BODY_BYTES": "4096",
            "CM_DRAIN_S": "20", "CM_READ_TIMEOUT_S": "1"}


def request(body: bytes, *, rid: str, accept: str | None = None, key: str = KEY,
            content_type: str | None = "application/json", length: int | None = None, extra: bytes = b"",
            path: bytes = b"/v1/generate") -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: cmserve", b"X-Request-ID: " + rid.encode(),
            b"Authorization: Bearer " + key.encode(), b"Content-Length: %d" % (len(body) if length is None else length)]
    if content_type:
        head.append(b"Content-Type: " + content_type.encode())
    if accept:
        head.append(b"Accept: " + accept.encode())
    return b"\r\n".join(head) + b"\r\n" + extra + b"\r\n" + body


@dataclass
class Step:
    """Bytes to send, then a pause; `close` ends the connection after the last step without reading."""

    data: bytes
    pause_s: float = 0.0


@dataclass
class Case:
    name: str
    steps: list[Step]
    responses: int  # how many responses to read (0: the client leaves)
    ids: list[str]  # request ids whose log lines to compare


def _valid(rid: str, body: bytes = b'{"n": 2, "steps": 2, "seed": 11}', **kw: Any) -> bytes:
    return request(body, rid=rid, **kw)




def _png_b64(size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(size * size, dtype=np.uint8).reshape(size, size) * 3).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue())


# An 8×8 grey image (a PNG) whose lower half is regenerated.
EDIT_BODY = b'{"task": "inpaint", "box": [0, 4, 8, 8], "n": 2, "seed": 3, "steps": 2, "image": "' + _png_b64() + b'"}'
HALF = b'{"n": 1, "se'
REST = b'ed": 5}'
CASES = [
    Case("valid", [Step(_valid("valid"))], 1, ["valid"]),
    Case("edit", [Step(request(EDIT_BODY, rid="edit", path=b"/v1/edit"))], 1, ["edit"]),
    Case("edit, invalid box", [Step(request(EDIT_BODY.replace(b"[0, 4, 8, 8]", b"[0, 4, 9, 8]"), rid="edit-box",
                                            path=b"/v1/edit"))], 1, ["edit-box"]),
    Case("raw image", [Step(_valid("raw", b'{"seed": 12}', accept="image/png"))], 1, ["raw"]),
    Case("invalid field", [Step(request(b'{"n": 0}', rid="invalid"))], 1, ["invalid"]),
    Case("unknown model", [Step(request(b'{"model": "x"}', rid="unknown"))], 1, ["unknown"]),
    Case("not json", [Step(request(b'{"n": 1', rid="notjson"))], 1, ["notjson"]),
    Case("text/plain", [Step(request(b'{"n": 1}', rid="plain", content_type="text/plain"))], 1, ["plain"]),
    Case("too many images", [Step(request(b'{"n": 999}', rid="many"))], 1, ["many"]),
    Case("wrong key", [Step(request(b'{"n": 1}', rid="key", key="z" * 25))], 1, ["key"]),
    Case("body over the cap", [Step(request(b"{}", rid="cap", length=5000))], 1, ["cap"]),
    Case("slow body", [Step(request(HALF, rid="slow", length=len(HALF + REST)), 0.3), Step(REST)], 1, ["slow"]),
    Case("client gone mid-body", [Step(request(HALF, rid="gone", length=len(HALF + REST)), 0.3)], 0, ["gone"]),
    Case("head over the cap", [Step(request(b'{"n": 1}', rid="bighead", extra=b"X-Pad: " + b"x" * 17000 + b"\r\n"))],
         1, ["bighead"]),
    Case("too many headers", [Step(request(b'{"n": 1}', rid="headers",
                                           extra=b"".join(b"X-%d: x\r\n" % i for i in range(100))))], 1, ["headers"]),
    Case("body not in time", [Step(request(HALF, rid="late", length=len(HALF + REST)))], 1, ["late"]),
    Case("seed out of range", [Step(request(b'{"n": 2, "seed": 9223372036854775807}', rid="seed"))], 1, ["seed"]),
    Case("4 KiB Accept", [Step(_valid("accept", accept=", ".join(f"text/x-{i}" for i in range(400))))], 1,
         ["accept"]),
    Case("pipelined", [Step(_valid("p1") + b"GET /healthz HTTP/1.1\r\nHost: cmserve\r\nX-Request-ID: p-health\r\n\r\n"
                            + request(b'{"n": 0}', rid="p2") + _valid("p3", b'{"n": 3, "seed": 4}'))],
         4, ["p1", "p2", "p3"]),
]


def read_responses(sock: socket.socket, count: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """`count` Content-Length framed responses: (status line, headers, body)."""
    out, buffer = [], b""
    while len(out) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} responses"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        length = int(headers[b"content-length"])
        while len(buffer) < length:
            buffer += sock.recv(65536)
        out.append((status, headers, buffer[:length]))
        buffer = buffer[length:]
    return out


def comparable(response: tuple[bytes, dict[bytes, bytes], bytes]) -> tuple[Any, ...]:
    status, headers, body = response
    headers = {k: v for k, v in headers.items() if k != b"date"}
    if headers.get(b"content-type") == b"application/json":
        doc = json.loads(body)
        for varying in ("created", "timings_ms"):
            doc.pop(varying, None)
        headers.pop(b"content-length")
        return status, headers, doc
    return status, headers, body


def counters(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {key: value for key, value in server.metrics().items() if key[0] in COUNTERS}


def access_line(server: ServerProcess, rid: str) -> dict[str, Any]:
    line = server.wait_log(lambda r: r.get("logger") == "cmserve.access" and r.get("request_id") == rid, timeout=30)
    return {k: v for k, v in line.items() if k not in VARYING_LOG_FIELDS}


def run_case(server: ServerProcess, case: Case) -> dict[str, Any]:
    before = counters(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        for step in case.steps:
            sock.sendall(step.data)
            time.sleep(step.pause_s)
        responses = [comparable(r) for r in read_responses(sock, case.responses)]
    lines = [access_line(server, rid) for rid in case.ids]
    time.sleep(0.05)  # the metrics of the last answer are written right after its bytes
    after = counters(server)
    moved = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after.keys() | before.keys()}
    return {"responses": responses, "log": lines, "metrics": {k: v for k, v in moved.items() if v}}


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path) -> Iterator[dict[str, ServerProcess]]:
    with ExitStack() as stack:
        yield {path: stack.enter_context(server_process(CM_MODELS=f"tiny={tiny_checkpoint}",
                                                        CM_PROTOCOL_FAST_PATH=flag, **SETTINGS))
               for path, flag in (("protocol", "true"), ("asgi", "false"))}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_both_request_paths_answer_alike(servers: dict[str, ServerProcess], case: Case) -> None:
    results = {path: run_case(server, case) for path, server in servers.items()}
    assert results["protocol"] == results["asgi"]
    statuses = [r[0].split(b" ")[1] for r in results["asgi"]["responses"]]
    assert statuses == EXPECTED_STATUS[case.name]
    if case.name == "client gone mid-body":
        assert results["asgi"]["log"][0]["status"] == 499
        assert results["asgi"]["metrics"][("cmserve_request_failures_total",
                                           (("model", "unknown"), ("reason", "cancelled")))] == 1


EXPECTED_STATUS = {
    "valid": [b"200"], "edit": [b"200"], "edit, invalid box": [b"422"], "raw image": [b"200"],
    "invalid field": [b"422"], "unknown model": [b"404"],
    "not json": [b"422"], "text/plain": [b"415"], "too many images": [b"422"], "wrong key": [b"401"],
    "body over the cap": [b"413"], "slow body": [b"200"], "client gone mid-body": [],
    "pipelined": [b"200", b"200", b"422", b"200"],
    "head over the cap": [b"431"], "too many headers": [b"431"], "body not in time": [b"408"],
    "seed out of range": [b"422"], "4 KiB Accept": [b"406"],
}


def test_sigterm_while_a_body_arrives_is_a_503_on_both_paths(tiny_checkpoint: Path) -> None:
    """A request whose body is still on its way when SIGTERM comes is not yet admitted: the shutdown waits for its
    body (its task), then the handler refuses it (draining)."""
    results = {}
    for path, flag in (("protocol", "true"), ("asgi", "false")):
        with server_process(CM_MODELS=f"tiny={tiny_checkpoint}", CM_PROTOCOL_FAST_PATH=flag, **SETTINGS) as server, \
                socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(request(HALF, rid="term", length=len(HALF + REST)))
            time.sleep(0.2)
            server.proc.send_signal(signal.SIGTERM)
            server.wait_log(lambda r: str(r.get("msg", "")).startswith("draining"), timeout=10)
            sock.sendall(REST)
            responses = [comparable(r) for r in read_responses(sock, 1)]
            results[path] = (responses, access_line(server, "term"))
            assert server.proc.wait(30) == 0, server.tail()
    assert results["protocol"] == results["asgi"]
    status, _, doc = results["asgi"][0][0]
    assert status.split(b" ")[1] == b"503" and doc["error"]["type"] == "draining"
