"""uvicorn's httptools protocol with the limits httptools lacks, and an optional accelerator for POST /v1/generate and
/v1/edit.

`ServiceProtocol` is what the server always runs (both request paths), uvicorn's protocol plus:
  - a cap on the request head (CM_MAX_HEADER_BYTES: the URL and every header's name and value, 4 bytes more
    each for ": " and CRLF) and on the number of headers (CM_MAX_HEADERS): beyond either, 431 and the
    connection closes. httptools has no such limit and buffers a header however long it grows;
    bytes that arrive inside one unfinished header line are counted as they come, so nothing past the
    cap is kept (at most one read of the socket beyond it).
  - a read timeout (CM_READ_TIMEOUT_S) from a request's first byte until its body is complete, and from a
    connection's opening until its first byte: the server checks the connections a few times a second
    (`check_connections`, no timer per request). A head that has not arrived gets 408 and the connection closes; a
    body that has not arrived ends its request with 408 through the generate handler (both paths) and closes
    the connection; a new connection that never sent anything is closed. Time that the server itself
    holds reading back (a pipelined request waiting its turn) does not count. Idle keep-alive connections are
    closed by uvicorn's keep-alive timeout.
  - a disconnect reaches every request of the connection: the one being answered and those pipelined
    behind it (uvicorn tells only the newest), so a job of any of them leaves the queue. While pipelined
    requests wait, uvicorn stops reading the connection, so the event loop would not see the client leave:
    the same checks ask the socket whether its peer hung up.
  - each request's arrival time (its headers read) in the ASGI scope, so that a pipelined request's deadline
    counts from its arrival, not from when its turn came.

`GenerateProtocol` adds the accelerator: on the CPU at thousands of requests per second the event loop's
work per request limits the server, and uvicorn's request cycle, FastAPI's routing and Starlette's response
objects are a large share of it (docs/perf-log.md, "What each HTTP layer costs"). A request that `may_take`
accepts is answered by the same `GenerateHandler` as the FastAPI route (generate.py), from its arrival on; this
module only supplies the body as it arrives, the disconnect as the connection reports it, and one write of the
response.
Every other request goes to the ASGI app as without it. CM_PROTOCOL_FAST_PATH=false turns it off.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..errors import BodyTooLarge, Cancelled, RequestTimeout
from ..settings import Settings
from .edit import EDIT
from .errors import error_reply
from .generate import PATH, GenerateHandler
from .requests import ARRIVED_KEY, READ_TIMED_OUT_KEY, Headers, Reply, log_request, new_request_log

# The protocols rely on uvicorn's protocol internals (its parser callbacks and per-connection state) as they
# are in this version, the one requirements.txt pins (a test keeps the two equal). With any other, the server
# keeps uvicorn's own protocol (server.http_protocol), without these limits.
UVICORN_VERSION = "0.54.0"
_PATH = PATH.encode()
_EDIT_PATH = EDIT.path.encode()
HEADER_OVERHEAD = 4  # ": " and CRLF of each header line, counted against CM_MAX_HEADER_BYTES
# poll() events of a socket whose peer hung up (POLLRDHUP: Linux, even with unread data before the hang-up)
HANGUP_EVENTS = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
LINGER_S = 2.0  # after a refusal, how long what the client still sends is read and dropped before closing


@dataclass(frozen=True, slots=True)
class Limits:
    """What a connection may send: the request head's size and header count, and the time it may take."""

    max_header_bytes: int
    max_headers: int
    read_timeout_s: float

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.max_header_bytes, settings.max_headers, settings.read_timeout_s)


def read_timeout_error(limits: Limits) -> RequestTimeout:
    return RequestTimeout(f"the request did not arrive within {limits.read_timeout_s:g} s (CM_READ_TIMEOUT_S)")


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request the protocol refuses (its reply is set first)."""


def check_connections(connections: Iterable[Any], now: float, timeout_s: float) -> None:
    """What the server checks a few times a second (no timer per request): the requests (or the first byte
    of a new connection) that have taken longer than `timeout_s` to arrive, and the clients that left while
    the server held their reading back. `now` is the event loop's time."""
    for connection in list(connections):
        check = getattr(connection, "check", None)
        if check is not None:
            check(now, timeout_s)


class ServiceProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a capped head, a read timeout and disconnects for every request of a
    connection (see the module docstring)."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._max_head_bytes, self._max_headers = limits.max_header_bytes, limits.max_headers
        # loop.time() since the request being read began (or the connection opened); None while none is
        self.reading_since: float | None = None
        self._head: int | None = None  # bytes of the request head counted so far; None outside a head
        self._stalled = 0  # bytes that arrived inside one unfinished header line, not yet counted in _head
        self._active: Any = None  # the cycle being answered (uvicorn's, or GenerateProtocol's _Cycle)
        self._refusal: Reply | None = None
        self._timed_out = False  # a read timeout has been passed to the request being read
        self._lingering = False  # refused: what arrives is dropped until the connection closes

    # Connection ------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.reading_since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        active, pipelined = self._active, [cycle for cycle, _ in self.pipeline]
        super().connection_lost(exc)  # tells only the newest request (self.cycle)
        for cycle in (active, *pipelined):
            if cycle is not None and not cycle.response_complete and not cycle.disconnected:
                cycle.disconnected = True
                cycle.message_event.set()

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the head's bytes counted while one header line is unfinished, and refusals."""
        if self._lingering or self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        head, headers = self._head, self.headers
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(self._refusal)
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        if head is not None and self._head == head and self.headers is headers:  # all of it in one header line
            self._stalled += len(data)
            if head + self._stalled > self.limits.max_header_bytes:
                self._refuse(self._head_too_large())

    def check(self, now: float, timeout_s: float) -> None:
        """Called a few times a second (check_connections)."""
        if self.flow is not None and self.flow.read_paused:
            self._check_hangup()
        since = self.reading_since
        if since is not None and now - since > timeout_s:
            self.expire_read(now)

    def _check_hangup(self) -> None:
        """While reading is paused (requests pipelined behind a long one) the event loop does not see the client
        leave; ask the socket: a peer that hung up ends the connection, and every request of it learns."""
        sock = self.transport.get_extra_info("socket")
        if sock is None or self.transport.is_closing():
            return
        poller = select.poll()
        poller.register(sock.fileno(), HANGUP_EVENTS)
        if poller.poll(0):
            self.transport.close()

    def expire_read(self, now: float) -> None:
        """The request being read (or the first one of a new connection) took longer than CM_READ_TIMEOUT_S."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self.flow.read_paused or (self._head is not None and self._busy()):
            # the server holds reading back (a pipelined request waits its turn), or the client may wait for the
            # answer to its earlier request before it sends the rest of this one: not late
            self.reading_since = now
        elif self._head is not None:  # its head has not arrived
            self._refuse(error_reply(408, "request_timeout", read_timeout_error(self.limits).message))
        elif cycle is None or cycle.response_complete or self._timed_out:  # nothing begun, answered, or told
            self.transport.close()
        else:  # its body has not arrived: its handler answers 408 and the connection closes after it
            self._timed_out = True
            self.reading_since = now  # if it is not answered within another timeout, the connection closes
            cycle.keep_alive = False
            self._time_out_body(cycle)

    def _time_out_body(self, cycle: Any) -> None:
        cycle.scope[READ_TIMED_OUT_KEY] = read_timeout_error(self.limits)  # asgi_body (routes.py) raises it
        cycle.message_event.set()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._active = cycle
        super()._start_asgi_task(cycle, app)

    # Parser callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head, self._stalled, self._timed_out = 0, 0, False
        self.reading_since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self.url += url  # uvicorn's, inlined (as in on_header: this runs for every request)
        head = self._head = self._head + len(url)  # type: ignore[operator]
        if head > self._max_head_bytes:
            self._refusal = self._head_too_large()
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()  # uvicorn's, inlined
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        headers = self.headers
        headers.append((name, value))
        head = self._head = self._head + len(name) + len(value) + HEADER_OVERHEAD  # type: ignore[operator]
        self._stalled = 0  # those bytes were this header's
        if head > self._max_head_bytes or len(headers) > self._max_headers:
            self._refusal = self._head_too_large()
            raise _Refused

    def on_headers_complete(self) -> None:
        self._to_asgi(self._head_complete())

    def on_message_complete(self) -> None:
        self.reading_since = None
        super().on_message_complete()

    def _head_complete(self) -> float:
        """The head has arrived: stop counting it; the request's arrival time."""
        self._head = None
        return time.monotonic()

    def _to_asgi(self, arrived: float) -> None:
        self.scope[ARRIVED_KEY] = arrived  # type: ignore[literal-required]
        HttpToolsProtocol.on_headers_complete(self)

    # Refusals --------------------------------------------------------------

    def _head_too_large(self) -> Reply:
        limits = self.limits
        if len(self.headers) > limits.max_headers:
            message = f"the request has more than {limits.max_headers} headers (CM_MAX_HEADERS)"
        else:
            message = f"the request's URL and headers exceed {limits.max_header_bytes} bytes (CM_MAX_HEADER_BYTES)"
        return error_reply(431, "headers_too_large", message)

    def _refuse(self, reply: Reply) -> None:
        """Answer a request whose head the protocol refuses, and close the connection (nothing of it reaches the
        app). With an earlier request still being answered the connection just closes. Otherwise the close
        lingers: the server stops writing, drops what still arrives for up to LINGER_S, then closes, so that
        the client reads the answer (closing with unread bytes would send a reset that can destroy it)."""
        self._refusal = None
        log = new_request_log(self.headers or [], time.monotonic())
        log_request("-", "-", log, reply.status, 0.0)
        if self._busy() or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.write_reply(reply, log.request_id, keep_alive=False)
        self.transport.write_eof()
        self.reading_since = None
        self._lingering = True
        self.loop.call_later(LINGER_S, self.transport.close)

    def _busy(self) -> bool:
        active = self._active
        return bool(self.pipeline) or (active is not None and not active.response_complete)

    def write_reply(self, reply: Reply, request_id: str, keep_alive: bool) -> None:
        """The whole response in one write, with the headers the ASGI route's response has, in its order."""
        content = [STATUS_LINE[reply.status]]
        for name, value in (*self.server_state.default_headers, *reply.headers):
            content += (name, b": ", value, b"\r\n")
        content += (b"x-request-id: ", request_id.encode(), b"\r\n",
                    b"content-length: ", str(len(reply.body)).encode(), b"\r\n")
        if not keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", reply.body)
        self.transport.write(b"".join(content))


def may_take(method: bytes, url: bytes, http_version: str, keep_alive: bool, upgrade: bool, expect_continue: bool,
             idle: bool, headers: Headers, max_body: int, paths: Container[bytes] = (_PATH, _EDIT_PATH)) -> bool:
    """Whether the protocol answers this request itself, from its request line and headers.

    POST to one of `paths` exactly (/v1/generate, /v1/edit), HTTP/1.1 with keep-alive, no Upgrade or Expect:
    100-continue, on a connection with no earlier request still being answered (pipelined requests queue as
    uvicorn queues them), with one Content-Length up to `max_body` and no Transfer-Encoding. Anything else is
    left to the ASGI app.
    """
    if method != b"POST" or url not in paths or http_version != "1.1" or not keep_alive or upgrade or expect_continue:
        return False
    if not idle:
        return False
    length = None
    for name, value in headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return False
            length = int(value)
        elif name == b"transfer-encoding":
            return False
    return length is not None and length <= max_body


class _Cycle:
    """Stands for uvicorn's RequestResponseCycle while the protocol answers a request itself.

    uvicorn's protocol reads `response_complete` (a pipelined request waits until it is True), sets
    `keep_alive` False in a graceful shutdown (close after the response), and on connection_lost sets
    `disconnected` and calls `message_event.set()`.
    """

    __slots__ = ("_body", "_chunks", "_on_disconnect", "disconnected", "keep_alive", "response_complete")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.response_complete = False
        self.keep_alive = True
        self.disconnected = False
        self._chunks: list[bytes] = []
        self._body: asyncio.Future[bytes] = loop.create_future()
        self._on_disconnect: Callable[[], None] | None = None

    @property
    def message_event(self) -> _Cycle:  # connection_lost calls message_event.set()
        return self

    def set(self) -> None:
        if not self.disconnected:
            return
        if not self._body.done():
            self._body.set_exception(Cancelled("the client disconnected before sending the whole body"))
        if self._on_disconnect is not None:
            self._on_disconnect()

    def add_body(self, chunk: bytes) -> None:
        self._chunks.append(chunk)

    def body_complete(self) -> None:
        if not self._body.done():
            self._body.set_result(b"".join(self._chunks))
        self._chunks = []

    def body_timed_out(self, error: RequestTimeout) -> None:
        if not self._body.done():
            self._body.set_exception(error)
        self._chunks = []

    async def read_body(self, limit: int) -> bytes:
        body = await self._body
        if len(body) > limit:  # (may_take admits only a declared length within the cap)
            raise BodyTooLarge(limit)
        return body

    def watch(self, on_disconnect: Callable[[], None]) -> Callable[[], None]:
        if self.disconnected:  # gone before the answer began to wait
            asyncio.get_running_loop().call_soon(on_disconnect)
        self._on_disconnect = on_disconnect
        return self._unwatch

    def _unwatch(self) -> None:
        self._on_disconnect = None


class GenerateProtocol(ServiceProtocol):
    """ServiceProtocol that answers the sampling requests it may take itself (see the module docstring)."""

    def __init__(self, *args: Any, handlers: Mapping[bytes, GenerateHandler], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handlers = handlers  # by path: /v1/generate, /v1/edit
        self.max_body = next(iter(handlers.values())).state.settings.max_body_bytes
        self._taking: _Cycle | None = None  # the request taken, while its body arrives

    # Parser callbacks ----------------------------------------------------

    def on_headers_complete(self) -> None:
        arrived = self._head_complete()
        idle = not self.pipeline and (self.cycle is None or self.cycle.response_complete)
        if not may_take(self.parser.get_method(), self.url, self.parser.get_http_version(),
                        self.parser.should_keep_alive(), self.parser.should_upgrade(), self.expect_100_continue,
                        idle, self.headers, self.max_body, self.handlers):
            self._to_asgi(arrived)
            return
        cycle = self._taking = self._active = self.cycle = _Cycle(self.loop)  # type: ignore[assignment]
        task = self.loop.create_task(self._answer(self.handlers[self.url], cycle, self.headers, arrived))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_body(self, body: bytes) -> None:
        if self._taking is None:
            super().on_body(body)
        else:
            self._taking.add_body(body)

    def on_message_complete(self) -> None:
        if self._taking is None:
            super().on_message_complete()
            return
        self.reading_since = None
        self._taking.body_complete()
        self._taking = None

    def _time_out_body(self, cycle: Any) -> None:
        if cycle is self._taking:
            cycle.body_timed_out(read_timeout_error(self.limits))  # the rest of its body, if any comes, is dropped
        else:
            super()._time_out_body(cycle)

    # Answering -----------------------------------------------------------

    async def _answer(self, handler: GenerateHandler, cycle: _Cycle, headers: Headers, arrived: float) -> None:
        log = handler.begin(headers, arrived)
        status = 500
        try:
            reply = await handler.answer(log, headers, cycle.read_body, cycle.watch)
            status = reply.status
            if not cycle.disconnected:
                if self.flow.write_paused:
                    await self.flow.drain()
                self.write_reply(reply, log.request_id, cycle.keep_alive)
        finally:
            handler.end(log, status)
            cycle.response_complete = True
            if not cycle.keep_alive and not self.transport.is_closing():
                self.transport.close()
            self.on_response_complete()  # uvicorn's: the next pipelined request, or the keep-alive timer
