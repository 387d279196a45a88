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
from service.api.errors import service_error_reply
from service.api.generate import DisconnectWatch, GenerateHandler, ReadBody
from service.api.protocol import GenerateProtocol, Limits, ServiceProtocol, _Cycle, may_take
from service.api.requests import ARRIVED_KEY, Headers, Reply, RequestLog
from service.api.routes import asgi_body
from service.api.security import ApiKeys, RateLimiter
from service.errors import Cancelled, RequestTimeout
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
        self.eof = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True  # a lingering close: the protocol closes it a little later

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
        self.arrived: list[float] = []  # the arrival time of each request the ASGI app got

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.arrived.append(scope[ARRIVED_KEY])
        try:
            body = await asgi_body(receive, scope)(1 << 20)  # the route's reader
        except (Cancelled, RequestTimeout) as e:
            self.asgi.append((scope["method"], scope["path"], type(e).__name__.encode()))
            reply = service_error_reply(e)
            await send({"type": "http.response.start", "status": reply.status,
                        "headers": [*reply.headers, (b"content-length", str(len(reply.body)).encode())]})
            await send({"type": "http.response.body", "body": reply.body})
            return
        self.asgi.append((scope["method"], scope["path"], body))
        if not self.release.is_set():  # held, as a long request is: the next message can only be a disconnect
            self.asgi.append(("", "", (await receive())["type"].encode()))
            return
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
        except RequestTimeout as e:
            self.recorder.answered.append("timed out")
            return service_error_reply(e)
        self.recorder.answered.append(json.loads(body))
        await self.recorder.release.wait()
        return Reply(200, [(b"content-type", b"text/plain")], b"fast")


async def feed(*chunks: bytes, max_body: int = 4096, release: bool = True, fast: bool = True,
               **limits: Any) -> tuple[Recorder, Any]:
    """A protocol that has been fed `chunks`; its own answers come from a RecordingHandler (`fast`; else
    ServiceProtocol, whose requests all go to the ASGI app). `limits`: settings of the head cap and read timeout."""
    recorder = Recorder()
    config = uvicorn.Config(recorder.app, lifespan="off", log_config=None, interface="asgi3")
    config.load()
    state = ServiceState(Settings(max_body_bytes=max_body, **limits), engine_factory=None)  # type: ignore[arg-type]
    handler = RecordingHandler(state, recorder)
    common = {"config": config, "server_state": ServerState(), "app_state": {}, "limits": Limits.of(state.settings)}
    protocol = GenerateProtocol(**common, handlers={b"/v1/generate": handler}) if fast else ServiceProtocol(**common)
    protocol.connection_made(Transport())
    if release:
        recorder.release.set()
    for chunk in chunks:
        protocol.data_received(chunk)
        await asyncio.sleep(0)
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
    assert protocol.handlers[b"/v1/generate"].state.in_flight == 0


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
        return recorder.answered, protocol.transport.written, protocol.handlers[b"/v1/generate"].state.in_flight  # type: ignore

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
    ({1: b"/v1/edit"}, LENGTH, True),
    ({1: b"/v1/models"}, LENGTH, False),
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
        return seen, protocol.transport.written, protocol.handlers[b"/v1/generate"].state.in_flight  # type: ignore[attr-defined]

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


@pytest.mark.parametrize(("settings", "fast"), [({}, True), ({"protocol_fast_path": False}, False),
                                                ({"opentelemetry": True}, False)])
def test_the_server_answers_generate_in_the_protocol_unless_turned_off_or_tracing(settings: dict[str, Any],
                                                                                 fast: bool) -> None:
    """Either way the protocol is ours, with the head cap and read timeout (ServiceProtocol)."""
    from service.app import create_app
    from service.server import http_protocol

    chosen = http_protocol(Settings(**settings), create_app(Settings(**settings)))
    assert chosen.func is (GenerateProtocol if fast else ServiceProtocol)
    assert chosen.keywords["limits"] == Limits(16384, 100, 10.0)


def test_the_protocol_is_used_only_with_the_uvicorn_it_was_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from service.app import create_app
    from service.server import http_protocol

    pins = (Path(__file__).resolve().parents[4] / "requirements.txt").read_text().splitlines()
    assert f"uvicorn=={protocol_module.UVICORN_VERSION}" in pins  # move the two together
    monkeypatch.setattr(uvicorn, "__version__", "0.99.0")
    assert http_protocol(Settings(), create_app(Settings())) == "auto"


# ---------------------------------------------------------------------- limits of ServiceProtocol (both paths)

BOTH = pytest.mark.parametrize("fast", [True, False], ids=["protocol", "asgi"])


def status_of(written: bytes) -> int:
    return int(written.split(b" ", 2)[1]) if written else 0


@BOTH
@pytest.mark.parametrize(("extra", "status"), [
    ({b"X-Pad": b"x" * 15000}, 200),  # under 16 KiB in all
    ({b"X-Pad": b"x" * 17000}, 431),
    ({b"X-Pad-%d" % i: b"x" for i in range(97)}, 200),  # 100 headers with the 3 of post()
    ({b"X-Pad-%d" % i: b"x" for i in range(98)}, 431),
])
def test_a_request_head_over_the_caps_gets_431_and_the_connection_closes(fast: bool, extra: dict[bytes, bytes],
                                                                          status: int) -> None:
    recorder, protocol = asyncio.run(feed(post(headers=extra), fast=fast))
    written = protocol.transport.written
    assert status_of(written) == (200 if status == 200 else status)
    if status == 431:
        assert recorder.answered == [] and recorder.asgi == []  # nothing of it reached the app
        assert protocol.transport.eof and b"connection: close" in written
        assert json.loads(written.partition(b"\r\n\r\n")[2])["error"]["type"] == "headers_too_large"


@BOTH
def test_one_endless_header_line_is_refused_once_past_the_cap_without_keeping_it(fast: bool) -> None:
    async def run() -> tuple[int, Any]:
        _, protocol = await feed(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-Pad: ", fast=fast)
        sent = 0
        while not protocol.transport.eof and sent < 1 << 20:
            protocol.data_received(b"y" * 1024)  # never a complete line
            sent += 1024
        return sent, protocol

    sent, protocol = asyncio.run(run())
    assert sent <= 17 * 1024 and status_of(protocol.transport.written) == 431 and protocol.transport.eof


def test_pipelined_small_requests_in_one_read_are_not_mistaken_for_a_large_head() -> None:
    get = b"GET /healthz HTTP/1.1\r\nHost: cmserve\r\nX-Pad: " + b"x" * 200 + b"\r\n\r\n"

    async def run() -> tuple[Recorder, Any]:
        recorder, protocol = await feed(get * 100 + post()[:40], fast=False)  # 25 KiB in one read
        for _ in range(100):
            await settle()
        return recorder, protocol

    recorder, protocol = asyncio.run(run())
    assert len(recorder.asgi) == 100 and not protocol.transport.is_closing()


@BOTH
def test_a_head_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(fast: bool) -> None:
    async def run() -> Any:
        _, protocol = await feed(post()[:30], fast=fast)
        protocol.expire_read(protocol.loop.time())
        return protocol

    protocol = asyncio.run(run())
    assert status_of(protocol.transport.written) == 408 and protocol.transport.eof
    assert json.loads(protocol.transport.written.partition(b"\r\n\r\n")[2])["error"]["type"] == "request_timeout"


@BOTH
def test_a_body_that_does_not_arrive_in_time_is_answered_408_by_its_handler_and_the_connection_closes(
        fast: bool) -> None:
    async def run() -> tuple[Recorder, Any]:
        recorder, protocol = await feed(post()[:-5], fast=fast)
        protocol.expire_read(protocol.loop.time())
        await settle()
        return recorder, protocol

    recorder, protocol = asyncio.run(run())
    assert (recorder.answered if fast else [body for _, _, body in recorder.asgi]) == (
        ["timed out"] if fast else [b"RequestTimeout"])
    written = protocol.transport.written
    assert status_of(written) == 408 and b"connection: close" in written and protocol.transport.is_closing()
    assert "CM_READ_TIMEOUT_S" in json.loads(written.partition(b"\r\n\r\n")[2])["error"]["message"]


@BOTH
def test_a_new_connection_that_sends_nothing_is_closed_silently(fast: bool) -> None:
    async def run() -> Any:
        _, protocol = await feed(fast=fast)
        assert protocol.reading_since is not None
        protocol.expire_read(protocol.loop.time())
        return protocol

    protocol = asyncio.run(run())
    assert protocol.transport.written == b"" and protocol.transport.is_closing()


@BOTH
def test_between_requests_nothing_is_being_read(fast: bool) -> None:
    _, protocol = asyncio.run(feed(post(), fast=fast))
    assert protocol.reading_since is None and not protocol.transport.is_closing()  # keep-alive's turn


def test_check_connections_times_out_only_the_connections_past_the_timeout() -> None:
    from service.api.protocol import check_connections

    async def run() -> list[bool]:
        protocols = [(await feed(post()))[1], (await feed(post()[:20]))[1], (await feed(post()[:20]))[1]]
        now = protocols[0].loop.time()
        protocols[2].reading_since = now - 11
        check_connections(protocols, now, timeout_s=10.0)
        return [p.transport.eof or p.transport.closed for p in protocols]

    assert asyncio.run(run()) == [False, False, True]


@BOTH
def test_a_disconnect_reaches_the_request_being_answered_behind_which_others_are_pipelined(fast: bool) -> None:
    """uvicorn tells only the newest request of a connection; the one being answered must learn it too, so that
    its job leaves the queue."""
    get = b"GET /healthz HTTP/1.1\r\nHost: cmserve\r\n\r\n"

    async def run() -> tuple[Recorder, list[str], Any]:
        recorder, protocol = await feed(post(), fast=fast, release=False)  # held: a long request
        first = protocol.cycle
        seen: list[str] = []
        if fast:
            first.watch(lambda: seen.append("gone"))  # as GenerateHandler._run_job does
        protocol.data_received(get + get)  # pipelined behind it
        await settle()
        assert protocol.cycle is not first and len(protocol.pipeline) == 2
        protocol.connection_lost(None)
        await settle()
        return recorder, seen, first

    recorder, seen, first = asyncio.run(run())
    assert first.disconnected
    if fast:
        assert seen == ["gone"]
    else:
        assert recorder.asgi[-1] == ("", "", b"http.disconnect")


def test_a_head_pipelined_behind_a_request_still_being_answered_is_not_late() -> None:
    async def run() -> Any:
        recorder, protocol = await feed(post(), release=False)  # a long answer
        protocol.data_received(b"GET /healthz HTTP/1.1\r\nHo")  # the next head, unfinished
        protocol.expire_read(protocol.loop.time())
        assert protocol.transport.written == b"" and not protocol.transport.closed
        recorder.release.set()
        await settle()
        return protocol

    protocol = asyncio.run(run())
    assert status_of(protocol.transport.written) == 200 and not protocol.transport.closed


def test_a_pipelined_request_counts_from_its_arrival_not_from_its_turn() -> None:
    """Its deadline (CM_REQUEST_TIMEOUT_S) counts from when its headers arrived, on both paths."""
    import time

    async def run() -> tuple[float, float, list[float]]:
        recorder, protocol = await feed(post(), release=False)  # a long answer
        sent = time.monotonic()
        protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: cmserve\r\n\r\n")  # its turn comes later
        await asyncio.sleep(0.2)
        released = time.monotonic()
        recorder.release.set()
        await settle()
        return sent, released, recorder.arrived

    sent, released, arrived = asyncio.run(run())
    assert len(arrived) == 1 and sent <= arrived[0] < released


def test_the_head_counts_the_url_and_each_header_with_its_separators() -> None:
    async def run() -> int | None:
        _, protocol = await feed(fast=False)
        protocol.on_message_begin()
        protocol.on_url(b"/v1/generate")
        protocol.on_header(b"Host", b"cmserve")
        return protocol._head

    assert asyncio.run(run()) == len("/v1/generate") + len("host") + len("cmserve") + 4
