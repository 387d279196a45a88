"""POST /v1/generate answered in uvicorn's HTTP protocol, below ASGI, for the requests that allow it.

At thousands of requests per second on the CPU the event loop's work per request limits the server, and about a
fifth of it is the ASGI plumbing around the answer: uvicorn's request cycle (its scope, events, task and
message dicts), the middleware layers and Starlette's response object (BENCHMARKS.md). `GenerateProtocol` is
uvicorn's httptools protocol with one addition: a request it can take whole, it answers itself with the same
code as the ASGI route (`respond`, routes.py), request id, log line and metrics as `RequestContext` does them,
and one write of the whole response. It takes a request when:
- it is POST /v1/generate exactly, HTTP/1.1 with keep-alive, without Expect, Upgrade or Transfer-Encoding, with a
  Content-Length up to CM_MAX_BODY_BYTES and a JSON content type;
- no earlier request of the connection is still being answered (pipelined ones queue as uvicorn queues them);
- its body is a valid request (`fastpath._parse`).
Every other request, and one whose body turns out invalid, goes to the ASGI app exactly as without it (FastAPI
then gives the documented error). API keys, the rate limit, readiness and draining are checked by the same
code as there, and their errors answered the same way. A client that disconnects is seen at once
(`connection_lost`), and its queued images are removed then, with no watcher task. uvicorn's graceful shutdown
waits for these requests like its own: their task is in the server's task set, and a connection that is
answering one closes after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..state import ServiceState
from .errors import CLIENT_CLOSED_REQUEST
from .fastpath import _is_json, _parse, answer
from .middleware import GENERATE_PATH, RequestLog, end_request, request_id
from .security import ApiKeys, RateLimiter

# GenerateProtocol relies on uvicorn's protocol internals (its parser callbacks and per-connection state) as
# they are in this version, the one requirements.txt pins (a test keeps the two equal). With any other,
# the server keeps uvicorn's own protocol (server.http_protocol).
UVICORN_VERSION = "0.54.0"
_PATH = GENERATE_PATH.encode()


class GenerateAnswerer:
    """What the protocol needs to answer a generate request: the service and its checks (one per server)."""

    def __init__(self, state: ServiceState, api_keys: ApiKeys, rate_limiter: RateLimiter) -> None:
        self.state = state
        self.api_keys = api_keys
        self.rate_limiter = rate_limiter
        self.max_body = state.settings.max_body_bytes


class _Cycle:
    """Stands for uvicorn's RequestResponseCycle while the protocol answers a request itself.

    uvicorn's protocol reads these attributes: `response_complete` (a pipelined request waits until it is
    True), `keep_alive` (a graceful shutdown sets it False: close after the response), `disconnected` and
    `message_event.set()` (connection_lost). `watch` is the answer's disconnect watch (routes.respond): the
    disconnect is known at once, with no watcher task.
    """

    __slots__ = ("_on_disconnect", "disconnected", "keep_alive", "response_complete")

    def __init__(self) -> None:
        self.response_complete = False
        self.keep_alive = True
        self.disconnected = False
        self._on_disconnect: Callable[[], None] | None = None

    @property
    def message_event(self) -> _Cycle:  # connection_lost calls message_event.set()
        return self

    def set(self) -> None:
        if self.disconnected and self._on_disconnect is not None:
            self._on_disconnect()

    def watch(self, on_disconnect: Callable[[], None]) -> Callable[[], None]:
        if self.disconnected:  # gone before the answer began to wait
            asyncio.get_running_loop().call_soon(on_disconnect)
        self._on_disconnect = on_disconnect
        return self._unwatch

    def _unwatch(self) -> None:
        self._on_disconnect = None


class GenerateProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that answers the generate requests it can take itself (see the module)."""

    def __init__(self, *args: Any, answerer: GenerateAnswerer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answerer = answerer
        self._body: list[bytes] | None = None  # the body of a request taken, while it arrives

    # Parser callbacks ----------------------------------------------------

    def on_headers_complete(self) -> None:
        if self._takes():
            self._body = []
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._body is None:
            super().on_body(body)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._body is None:
            super().on_message_complete()
            return
        body = b"".join(self._body)
        self._body = None
        request = _parse(body)
        if request is None:  # to the ASGI app, as if never taken: it says what is wrong
            super().on_headers_complete()
            self.cycle.body = body
            super().on_message_complete()
            return
        cycle = self.cycle = _Cycle()  # type: ignore[assignment]
        task = self.loop.create_task(self._answer(cycle, request, self.headers))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _takes(self) -> bool:
        """Whether this request is one to answer here, from its request line and headers."""
        if self.url != _PATH or self.parser.get_method() != b"POST" or self.expect_100_continue:
            return False
        if self.parser.get_http_version() != "1.1" or not self.parser.should_keep_alive():
            return False
        if self.parser.should_upgrade() or self.pipeline or not (self.cycle is None or self.cycle.response_complete):
            return False
        length = content_type = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return False
                length = int(value)
            elif name == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
            elif name == b"transfer-encoding":
                return False
        return length is not None and length <= self.answerer.max_body and _is_json(content_type)

    # Answering -----------------------------------------------------------

    async def _answer(self, cycle: _Cycle, request: Any, headers: list[tuple[bytes, bytes]]) -> None:
        answerer = self.answerer
        state = answerer.state
        log = RequestLog(request_id=request_id(headers), started=time.monotonic())
        state.request_started()
        status = 500
        try:
            response = await answer(state, answerer.api_keys, answerer.rate_limiter, request, headers, log,
                                    cycle.watch)
            status = response.status_code
            if not cycle.disconnected and status != CLIENT_CLOSED_REQUEST:
                if self.flow.write_paused:
                    await self.flow.drain()
                self._write(response, log.request_id, cycle.keep_alive)
        finally:
            state.request_ended()
            end_request(state, log, "POST", GENERATE_PATH, status, time.monotonic() - log.started, generate=True)
            cycle.response_complete = True
            if not cycle.keep_alive and not self.transport.is_closing():
                self.transport.close()
            self.on_response_complete()  # uvicorn's: the next pipelined request, or the keep-alive timer

    def _write(self, response: Response, request_id: str, keep_alive: bool) -> None:
        """The whole response in one write: status line, uvicorn's default headers (date), the response's."""
        content = [STATUS_LINE[response.status_code]]
        for name, value in (*self.server_state.default_headers, *response.raw_headers):
            content += (name, b": ", value, b"\r\n")
        content += (b"x-request-id: ", request_id.encode(), b"\r\n")
        if not keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", response.body)
        self.transport.write(b"".join(content))
