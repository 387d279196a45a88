"""Which requests the HTTP protocol answers itself (service/api/protocol.py), and that the rest reach the ASGI app
as they would without it: fed byte for byte into the protocol, with a transport that keeps what is written.

That both paths give the same answers is tested against real server processes
(tests/integration/test_request_paths.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from service.api import protocol as protocol_module
from service.api.generate import DisconnectWatch, GenerateHandler, ReadBody
from service.api.protocol import GenerateProtocol, _Cycle, may_take
from service.api.requests import Headers, Reply, RequestLog
from service.api.security import ApiKeys, RateLimiter
from service.errors import Cancelled
from service.settings import Settings
from service.state import ServiceState

BODY = b'{"n": 1, "seed": 3}'


def post(body: bytes = BODY, path: bytes = b"/v1/generate", version: bytes = b"1.1",
         headers: dict[bytes, bytes] | None = None) -> bytes:
    head = {b"Host": b"cmserve", b"Content-Type": b"application/json", b"Content-Length": str(len(body)).encode()}
    head.update(headers or {})
    lines = b"".join(k + b": " + v + b"\r\n" for k, v in head.items() if v)
    return b"POST " + path + b" HTTP/" + version + b"\r\n" + lines + b"\r\n" + body


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)


class Recorder:
    """Both ways a request can go: the ASGI app (the body it reads) or the protocol's own answer."""

    def __init__(self) -> None:
        self.asgi: list[tuple[str, str, bytes]] = []
        self.answered: list[Any] = []
        self.release = asyncio.Event()  # the protocol's answers wait for this

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.asgi.append((scope["method"], scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"asgi"})


class RecordingHandler(GenerateHandler):
    """The real handler's begin and end; its answer records the body read and waits for `release`."""

    def __init__(self, state: ServiceState, recorder: Recorder) -> None:
        super().__init__(state, ApiKeys(""), RateLimiter(0))
        self.recorder = recorder

    async def answer(self, log: RequestLog, headers: Headers, read_body: ReadBody, watch: DisconnectWatch) -> Reply:
        try:
            body = await read_body(self.state.settings.max_body_bytes)
        except Cancelled:
            self.recorder.answered.append("cancelled")
            return Reply(499, [], b"")
        self.recorder.answered.append(json.loads(body))
        await self.recorder.release.wait()
        return Reply(200, [(b"content-type", b"text/plain")], b"fast")


async def feed(*chunks: bytes, max_body: int = 4096, release: bool = True) -> tuple[Recorder, GenerateProtocol]:
    """A protocol that has been fed `chunks`; its own answers come from a RecordingHandler."""
    recorder = Recorder()
    config = uvicorn.Config(recorder.app, lifespan="off", log_config=None, interface="asgi3")
    config.load()
    state = ServiceState(Settings(max_body_bytes=max_body), engine_factory=None)  # type: ignore[arg-type]
    handler = RecordingHandler(state, recorder)
    protocol = GenerateProtocol(config=config, server_state=ServerState(), app_state={}, handler=handler)
    protocol.connection_made(Transport())
    for chunk in chunks:
        protocol.data_received(chunk)
        await asyncio.sleep(0)
    if release:
        recorder.release.set()
    await settle()
    return recorder, protocol


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_plain_generate_request_is_answered_by_the_protocol() -> None:
    recorder, protocol = asyncio.run(feed(post(headers={b"X-Request-ID": b"abc-1"})))
    assert recorder.answered == [{"n": 1, "seed": 3}] and recorder.asgi == []
    head, _, body = protocol.transport.written.partition(b"\r\n\r\n")  # type: ignore[attr-defined]
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and body == b"fast"
    assert lines[1:] == [b"content-type: text/plain", b"x-request-id: abc-1", b"content-length: 4"]
    assert not protocol.transport.is_closing()  # keep-alive
    assert protocol.handler.state.in_flight == 0


def test_a_body_in_pieces_is_collected_first() -> None:
    whole = post()
    recorder, _ = asyncio.run(feed(whole[:30], whole[30:-5], whole[-5:]))
    assert recorder.answered == [{"n": 1, "seed": 3}]


def test_a_body_that_arrives_slowly_is_awaited() -> None:
    whole = post()

    async def run() -> Recorder:
        recorder, protocol = await feed(whole[:-5])
        assert recorder.answered == []  # the handler waits for the rest
        protocol.data_received(whole[-5:])
        await settle()
        return recorder

    assert asyncio.run(run()).answered == [{"n": 1, "seed": 3}]


def test_a_client_that_leaves_mid_body_is_answered_as_cancelled_and_counted() -> None:
    async def run() -> tuple[list[Any], bytes, int]:
        recorder, protocol = await feed(post()[:-5])
        protocol.connection_lost(None)
        await settle()
        return recorder.answered, protocol.transport.written, protocol.handler.state.in_flight  # type: ignore

    assert asyncio.run(run()) == (["cancelled"], b"", 0)


@pytest.mark.parametrize(("request_bytes", "taken"), [
    (post(), True),
    (post(headers={b"Content-Type": b"text/plain"}), True),  # the handler answers 415, as the route would
    (post(headers={b"Content-Type": None}), True),  # type: ignore[dict-item]
    (post(body=b'{"n": 0}'), True),  # the handler answers 422, as the route would
    (post(path=b"/v1/generate?x=1"), False),
    (post(path=b"/v1/generate/"), False),
    (post(version=b"1.0"), False),
    (post(headers={b"Connection": b"close"}), False),
    (post(headers={b"Expect": b"100-continue"}), False),
    (post(body=b'{"n": 1, "pad": "' + b"x" * 5000 + b'"}'), False),  # over the body cap
    (post(headers={b"Content-Length": None, b"Transfer-Encoding": b"chunked"},  # type: ignore[dict-item]
          body=b"13\r\n" + BODY + b"\r\n0\r\n\r\n"), False),
], ids=["plain", "text-plain", "no-type", "invalid", "query", "other-path", "http-1.0", "connection-close", "expect",
        "too-big", "chunked"])
def test_the_requests_taken_and_the_rest_reach_the_asgi_app_unchanged(request_bytes: bytes, taken: bool) -> None:
    recorder, _ = asyncio.run(feed(request_bytes))
    assert (len(recorder.answered), len(recorder.asgi)) == ((1, 0) if taken else (0, 1))


GENERATE = (b"POST", b"/v1/generate", "1.1", True, False, False, True)  # method … idle, as may_take takes them
LENGTH = [(b"content-length", b"10")]


@pytest.mark.parametrize(("change", "headers", "taken"), [
    ({}, LENGTH, True),
    ({}, [(b"content-length", b"4096")], True),
    ({}, [(b"content-length", b"4097")], False),  # over the cap: the route answers 413
    ({}, [], False),  # no length
    ({}, [(b"content-length", b"10"), (b"content-length", b"10")], False),
    ({}, [(b"content-length", b"+10")], False),
    ({}, [*LENGTH, (b"transfer-encoding", b"chunked")], False),
    ({0: b"GET"}, LENGTH, False),
    ({1: b"/v1/generate?x=1"}, LENGTH, False),
    ({2: "1.0"}, LENGTH, False),
    ({3: False}, LENGTH, False),  # Connection: close
    ({4: True}, LENGTH, False),  # Upgrade
    ({5: True}, LENGTH, False),  # Expect: 100-continue
    ({6: False}, LENGTH, False),  # an earlier request of the connection is still being answered
])
def test_may_take(change: dict[int, Any], headers: list[tuple[bytes, bytes]], taken: bool) -> None:
    args = [change.get(i, value) for i, value in enumerate(GENERATE)]
    assert may_take(*args, headers=headers, max_body=4096) is taken


def test_pipelined_requests_wait_for_the_answer_and_keep_their_order() -> None:
    get = b"GET /healthz HTTP/1.1\r\nHost: cmserve\r\n\r\n"
    second = post(body=json.dumps({"seed": 4}).encode())

    async def run() -> tuple[Recorder, bytes, bytes]:
        recorder, protocol = await feed(post() + get + second, release=False)
        before = protocol.transport.written  # type: ignore[attr-defined]
        recorder.release.set()
        await settle()
        return recorder, before, protocol.transport.written  # type: ignore[attr-defined]

    recorder, before, after = asyncio.run(run())
    assert before == b""  # nothing answered while the first request is
    assert recorder.answered == [{"n": 1, "seed": 3}]  # the later ones went the ASGI way, in order
    assert [(m, p) for m, p, _ in recorder.asgi] == [("GET", "/healthz"), ("POST", "/v1/generate")]
    assert after.index(b"fast") < after.index(b"asgi")


def test_a_client_that_leaves_while_answered_is_seen_at_once_and_gets_nothing() -> None:
    async def run() -> tuple[list[str], bytes, int]:
        recorder, protocol = await feed(post(), release=False)
        cycle = protocol.cycle
        assert isinstance(cycle, _Cycle)
        seen: list[str] = []
        cycle.watch(lambda: seen.append("gone"))  # as routes._run_job does while the images are made
        await settle()
        assert seen == []
        protocol.connection_lost(None)
        recorder.release.set()
        await settle()
        return seen, protocol.transport.written, protocol.handler.state.in_flight  # type: ignore[attr-defined]

    assert asyncio.run(run()) == (["gone"], b"", 0)


def test_a_watch_begun_after_the_client_left_fires_too() -> None:
    async def run() -> list[str]:
        cycle = _Cycle(asyncio.get_running_loop())
        cycle.disconnected = True
        seen: list[str] = []
        cycle.watch(lambda: seen.append("gone"))
        await settle()
        return seen

    assert asyncio.run(run()) == ["gone"]


def test_a_graceful_shutdown_closes_the_connection_after_the_answer() -> None:
    async def run() -> tuple[bool, bytes, bool]:
        recorder, protocol = await feed(post(), release=False)
        protocol.shutdown()  # what uvicorn calls on every connection when it shuts down
        open_while_answering = not protocol.transport.is_closing()
        recorder.release.set()
        await settle()
        return open_while_answering, protocol.transport.written, protocol.transport.is_closing()  # type: ignore

    open_while_answering, written, closed = asyncio.run(run())
    assert open_while_answering and closed
    assert written.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in written and written.endswith(b"fast")


@pytest.mark.parametrize(("settings", "ours"), [({}, True), ({"protocol_fast_path": False}, False),
                                                ({"opentelemetry": True}, False)])
def test_the_server_uses_this_protocol_unless_turned_off_or_tracing(settings: dict[str, Any], ours: bool) -> None:
    from service.app import create_app
    from service.server import http_protocol

    chosen = http_protocol(Settings(**settings), create_app(Settings(**settings)))
    assert (getattr(chosen, "func", None) is GenerateProtocol) is ours
    assert ours or chosen == "auto"  # uvicorn's own choice (httptools)


def test_the_protocol_is_used_only_with_the_uvicorn_it_was_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from service.app import create_app
    from service.server import http_protocol

    pins = (Path(__file__).resolve().parents[4] / "requirements.txt").read_text().splitlines()
    assert f"uvicorn=={protocol_module.UVICORN_VERSION}" in pins  # move the two together
    monkeypatch.setattr(uvicorn, "__version__", "0.99.0")
    assert http_protocol(Settings(), create_app(Settings())) == "auto"
