"""POST /v1/generate without FastAPI's per-request machinery, for the bodies it would accept anyway.

FastAPI's routing, dependency solving, body parsing and response plumbing cost about as much event-loop
time per request as the rest of the request (BENCHMARKS.md, "Serving"); at high request rates on the CPU
that time comes out of the network's cores. This pure ASGI middleware answers a well-formed JSON request
itself: the body validated as a `GenerateRequest` (it accepts a body only where FastAPI would, see `_parse`), the
API key and rate-limit checks that the route's dependency runs, then the route's own code (`respond`).
Anything else (another content type, a body that is not JSON or not valid) is replayed to FastAPI,
which gives the documented error, so both paths answer every request identically; the route also
keeps the OpenAPI document. Request ids, logs and metrics come from `RequestContext` around both.
It sits outside FastAPI's own stack (app.py, `ServiceApp`), so it answers its own unexpected errors.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError
from ..schemas import GenerateRequest
from ..state import ServiceState
from .errors import service_error_response, unexpected_error_response
from .middleware import GENERATE_PATH, RequestLog, request_log
from .routes import DisconnectWatch, asgi_disconnect_watch, respond
from .security import ApiKeys, RateLimiter


class GenerateFastPath:
    def __init__(self, app: ASGIApp, state: ServiceState, api_keys: ApiKeys, rate_limiter: RateLimiter) -> None:
        self.app = app
        self.state = state
        self.api_keys = api_keys
        self.rate_limiter = rate_limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != GENERATE_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        content_type = _header(headers, b"content-type")
        body, complete = await _read_body(receive)
        request = _parse(body) if complete and _is_json(content_type) else None
        if request is None:
            await self.app(scope, _replay(body, complete, receive), send)
            return
        response = await answer(self.state, self.api_keys, self.rate_limiter, request, headers, request_log(scope),
                                asgi_disconnect_watch(receive))
        await response(scope, receive, send)


async def answer(state: ServiceState, api_keys: ApiKeys, rate_limiter: RateLimiter, request: GenerateRequest,
                 headers: list[tuple[bytes, bytes]], log: RequestLog, watch: DisconnectWatch) -> Response:
    """The response to a valid generate request outside FastAPI (this middleware, protocol.py): the API key and
    rate-limit checks the route's dependency runs, then the route's code; errors answered as FastAPI's
    handlers would, which are not around these paths."""
    try:
        key = api_keys.check(_header(headers, b"authorization"))
        rate_limiter.check(key)
        return await respond(state, request, _header(headers, b"accept"), log, watch)
    except ServiceError as e:
        return service_error_response(e)
    except Exception:  # a bug
        return unexpected_error_response("POST", GENERATE_PATH)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of a header (names are lower case in ASGI), as Starlette's headers.get() returns it."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _is_json(content_type: str | None) -> bool:
    """application/json (any parameters) or application/*+json: the types FastAPI parses as JSON.

    Without a Content-Type FastAPI refuses the body (strict content types), so that goes to FastAPI too.
    """
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _parse(body: bytes) -> GenerateRequest | None:
    """The validated request, or None when it is not one (FastAPI then says why).

    pydantic parses and validates the JSON in one pass (`model_validate_json`), in 40% of the event loop's time
    of `json.loads` then `model_validate` as FastAPI does it (1.3 against 3.3 µs). Every body it accepts FastAPI
    accepts too, as the same request (tests/unit/service/test_schemas.py runs a corpus through both). A body that only
    FastAPI accepts (one that starts with a UTF-8 byte order mark) goes to FastAPI.
    """
    if not body:
        return None
    try:
        return GenerateRequest.model_validate_json(body)
    except ValidationError:
        return None


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """(the body, True), or (what came of it, False) when the client disconnected before the end."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """A receive that hands out the body already read, then the client's own messages (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replayed
