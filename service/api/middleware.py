"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers and slows every request).

`RequestContext` gives every request that reaches the ASGI app its request id (X-Request-ID echoed when sane,
else generated; the response carries it) and its access-log line. POST /v1/generate does both itself, as its
handler does on every path (generate.py). The arrival time is the one the HTTP protocol noted when the headers
arrived (protocol.py), or now when the app runs under another server.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .generate import PATH as GENERATE_PATH
from .requests import ARRIVED_KEY, log_request, new_request_log


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if ARRIVED_KEY not in scope:
            scope[ARRIVED_KEY] = time.monotonic()
        if scope["path"] == GENERATE_PATH and scope["method"] == "POST":
            await self.app(scope, receive, send)
            return
        log = new_request_log(scope["headers"], scope[ARRIVED_KEY])
        status = 500  # if the app raises before answering, the outer error middleware answers 500
        header = (b"x-request-id", log.request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log_request(scope["method"], scope["path"], log, status, time.monotonic() - log.started)
