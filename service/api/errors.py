"""Domain errors become HTTP here, and only here: status codes, headers and the error JSON shape.

Every error body is {"error": {"type", "message", "field"}}. Validation errors (FastAPI's 422) are
rewritten into that shape, naming the field; nothing a client sends can produce a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..errors import (
    BodyTooLarge,
    Cancelled,
    DeadlineExceeded,
    Draining,
    EngineFailure,
    InvalidRequest,
    NotAcceptable,
    NotReady,
    OutOfMemory,
    QueueFull,
    RateLimited,
    RequestTimeout,
    RetryLater,
    ServiceError,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
)
from ..schemas import GenerateRequest, Interpolation
from .requests import Reply

logger = logging.getLogger("cmserve.api")

CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client that went away; never reaches the client
JSON = b"application/json"
NOT_READY_RETRY_AFTER_S = 5

# Most specific class first: the first isinstance match wins.
ERROR_STATUS: list[tuple[type[ServiceError], int, str]] = [
    (UnknownModel, 404, "unknown_model"),
    (NotAcceptable, 406, "not_acceptable"),
    (BodyTooLarge, 413, "body_too_large"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (InvalidRequest, 422, "invalid_request"),
    (Unauthorized, 401, "unauthorized"),
    (RequestTimeout, 408, "request_timeout"),
    (RateLimited, 429, "rate_limited"),
    (QueueFull, 503, "queue_full"),
    (Draining, 503, "draining"),
    (NotReady, 503, "not_ready"),
    (OutOfMemory, 503, "out_of_memory"),
    (DeadlineExceeded, 504, "deadline_exceeded"),
    (Cancelled, CLIENT_CLOSED_REQUEST, "cancelled"),
    (EngineFailure, 500, "internal"),
]
HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    431: "headers_too_large",
    503: "unavailable",
}
NESTED: dict[str, type[BaseModel]] = {"interpolate": Interpolation}  # request fields that are objects


def error_reply(status: int, type_: str, message: str, field: str | None = None,
                headers: dict[str, str] | None = None) -> Reply:
    """The error JSON {"error": {"type", "message", "field"}} with its status and headers."""
    raw = [(b"content-type", JSON)] + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in
                                       (headers or {}).items()]
    return Reply(status, raw, orjson.dumps({"error": {"type": type_, "message": message, "field": field}}))


def error_response(status: int, type_: str, message: str, field: str | None = None, headers: Any = None) -> Response:
    return to_response(error_reply(status, type_, message, field, headers))


def to_response(reply: Reply) -> Response:
    """A Reply as a Starlette response (which adds content-length after the reply's headers)."""
    response = Response(reply.body, status_code=reply.status)
    response.raw_headers = [*reply.headers, *response.raw_headers]
    return response


def service_error_reply(error: ServiceError) -> Reply:
    """The HTTP reply for a domain error."""
    status, type_ = next(((s, t) for cls, s, t in ERROR_STATUS if isinstance(error, cls)), (500, "internal"))
    headers: dict[str, str] = {}
    if isinstance(error, RetryLater):
        headers["Retry-After"] = str(error.retry_after_s)
    elif isinstance(error, NotReady) and not isinstance(error, Draining):
        headers["Retry-After"] = str(NOT_READY_RETRY_AFTER_S)
    elif isinstance(error, OutOfMemory):
        headers["Retry-After"] = "1"
    elif isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return error_reply(status, type_, error.message, error.field, headers)


def _field_name(loc: tuple[Any, ...]) -> str | None:
    """('body', 'sigmas', 2) -> 'sigmas[2]', ('interpolate', 'alphas', 0) -> 'interpolate.alphas[0]'; union member
    tags ('int', 'str') are dropped; the body -> None."""
    parts = [p for p in loc if p != "body"]
    if not parts or not isinstance(parts[0], str):
        return None
    name, model = parts[0], NESTED.get(parts[0])
    for part in parts[1:]:
        if isinstance(part, int):
            name += f"[{part}]"
        elif model is not None and part in model.model_fields:
            name += f".{part}"
    return name


def _shown(value: Any) -> str:
    text = repr(value)
    return f" (got {text})" if len(text) <= 80 else ""


def describe_validation_error(errors: list[dict[str, Any]],
                              schema: type[BaseModel] = GenerateRequest) -> tuple[str, str | None]:
    """A message naming the first bad field, the value and what is allowed (`schema`: the request's model); and
    that field.

    Several errors for one field (a value that fits no member of a union) are joined with 'or'.
    """
    error = errors[0]
    kind, loc, msg = error.get("type", ""), tuple(error.get("loc", ())), error.get("msg", "invalid")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {error.get('ctx', {}).get('error', msg)}", None
    field = _field_name(loc)
    if field is None:
        return "request body must be a JSON object with the fields " + ", ".join(schema.model_fields), None
    if kind == "extra_forbidden":
        outer = NESTED.get(str(loc[-2])) if len(loc) > 1 else None  # an unknown key inside a nested object
        if outer is not None:
            field = f"{field}.{loc[-1]}"
        allowed = (outer or schema).model_fields
        return f"{field}: unknown field; allowed fields: {', '.join(allowed)}", field
    same = [e for e in errors if _field_name(tuple(e.get("loc", ()))) == field]
    msgs = dict.fromkeys(str(e.get("msg", "invalid")).removeprefix("Value error, ") for e in same)
    message = f"{field}: {' or '.join(msgs)}{_shown(error.get('input'))}"
    others = len({_field_name(tuple(e.get("loc", ()))) for e in errors} - {field})
    if others:
        message += f" (and {others} more invalid field{'s' if others > 1 else ''})"
    return message, field


async def _on_service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return to_response(service_error_reply(exc))


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, field = describe_validation_error(list(exc.errors())) if exc.errors() else ("invalid request", None)
    return error_response(422, "invalid_request", message, field)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    type_ = HTTP_TYPES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    return error_response(exc.status_code, type_, message, None, exc.headers)


def unexpected_error_reply(method: str, path: str) -> Reply:
    """500 for an exception nothing else handled; call it inside the `except` (it logs the traceback)."""
    logger.exception("unhandled error in %s %s", method, path)
    return error_reply(500, "internal", "internal server error; the request id identifies it in the logs")


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    return to_response(unexpected_error_reply(request.method, request.url.path))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
