"""An optional accelerator: POST /v1/generate answered in uvicorn's HTTP protocol, below ASGI.

On the CPU at thousands of requests per second the event loop's work per request limits the server, and
uvicorn's request cycle, FastAPI's routing and Starlette's response objects are a large share of it
(BENCHMARKS.md, "HTTP layers"). `GenerateProtocol` is uvicorn's httptools protocol with one addition: a
request that `may_take` accepts is answered by the same `GenerateHandler` as the FastAPI route (generate.py),
from its arrival on; this module only supplies the body as it arrives, the disconnect as the connection
reports it, and one write of the response. Every other request goes to the ASGI app as without it.
CM_PROTOCOL_FAST_PATH=false turns it off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..errors import BodyTooLarge, Cancelled
from .generate import PATH, GenerateHandler
from .requests import Headers, Reply

# GenerateProtocol relies on uvicorn's protocol internals (its parser callbacks and per-connection state) as
# they are in this version, the one requirements.txt pins (a test keeps the two equal). With any other,
# the server keeps uvicorn's own protocol (server.http_protocol).
UVICORN_VERSION = "0.54.0"
_PATH = PATH.encode()


def may_take(method: bytes, url: bytes, http_version: str, keep_alive: bool, upgrade: bool, expect_continue: bool,
             idle: bool, headers: Headers, max_body: int) -> bool:
    """Whether the protocol answers this request itself, from its request line and headers.

    POST /v1/generate exactly, HTTP/1.1 with keep-alive, no Upgrade or Expect: 100-continue, on a connection
    with no earlier request still being answered (pipelined requests queue as uvicorn queues them), with one
    Content-Length up to `max_body` and no Transfer-Encoding. Anything else is left to the ASGI app.
    """
    if method != b"POST" or url != _PATH or http_version != "1.1" or not keep_alive or upgrade or expect_continue:
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


class GenerateProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that answers the generate requests it may take itself (see the module)."""

    def __init__(self, *args: Any, handler: GenerateHandler, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler = handler
        self._taking: _Cycle | None = None  # the request taken, while its body arrives

    # Parser callbacks ----------------------------------------------------

    def on_headers_complete(self) -> None:
        idle = not self.pipeline and (self.cycle is None or self.cycle.response_complete)
        if not may_take(self.parser.get_method(), self.url, self.parser.get_http_version(),
                        self.parser.should_keep_alive(), self.parser.should_upgrade(), self.expect_100_continue,
                        idle, self.headers, self.handler.state.settings.max_body_bytes):
            super().on_headers_complete()
            return
        cycle = self._taking = self.cycle = _Cycle(self.loop)  # type: ignore[assignment]
        task = self.loop.create_task(self._answer(cycle, self.headers, time.monotonic()))
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
        self._taking.body_complete()
        self._taking = None

    # Answering -----------------------------------------------------------

    async def _answer(self, cycle: _Cycle, headers: Headers, arrived: float) -> None:
        handler = self.handler
        log = handler.begin(headers, arrived)
        status = 500
        try:
            reply = await handler.answer(log, headers, cycle.read_body, cycle.watch)
            status = reply.status
            if not cycle.disconnected:
                if self.flow.write_paused:
                    await self.flow.drain()
                self._write(reply, log.request_id, cycle.keep_alive)
        finally:
            handler.end(log, status)
            cycle.response_complete = True
            if not cycle.keep_alive and not self.transport.is_closing():
                self.transport.close()
            self.on_response_complete()  # uvicorn's: the next pipelined request, or the keep-alive timer

    def _write(self, reply: Reply, request_id: str, keep_alive: bool) -> None:
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
