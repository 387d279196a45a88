"""The generate handler's duties (service/api/generate.py), each answered the same on every path: the order of the
checks, the status and the failure reason of each error, and the accounting around a request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from service.api.generate import GenerateHandler, is_json, parse_request
from service.api.requests import Headers, Reply, RequestLog
from service.api.security import ApiKeys, RateLimiter
from service.errors import Cancelled, InvalidRequest, UnsupportedMediaType
from service.settings import Settings
from service.state import ServiceState

KEY = "k" * 24
JSON = [(b"content-type", b"application/json")]


def handler(**settings: Any) -> GenerateHandler:
    """A handler on a service that has not started (so never ready): every check before readiness runs for real."""
    state = ServiceState(Settings(**settings), engine_factory=None)  # type: ignore[arg-type]
    return GenerateHandler(state, ApiKeys([KEY]), RateLimiter(0))


def body_of(data: bytes, delay: float = 0.0) -> Any:
    async def read(limit: int) -> bytes:
        await asyncio.sleep(delay)
        return data

    return read


def never_read(limit: int) -> Any:
    raise AssertionError("the body was read")


def no_watch(on_disconnect: Any) -> Any:
    return lambda: None


def answer(h: GenerateHandler, headers: Headers, read: Any, started: float | None = None) -> tuple[Reply, RequestLog]:
    log = h.begin(headers, time.monotonic() if started is None else started)

    async def run() -> Reply:
        return await h.answer(log, headers, read, no_watch)

    reply = asyncio.run(run())
    h.end(log, reply.status)
    return reply, log


def error(reply: Reply) -> dict[str, Any]:
    return orjson.loads(reply.body)["error"]


AUTH = [(b"authorization", f"Bearer {KEY}".encode())]


@pytest.mark.parametrize(("headers", "read", "status", "type_", "reason"), [
    ([], never_read, 401, "unauthorized", "invalid"),  # the key before anything else
    ([*AUTH, (b"content-length", b"9999999")], never_read, 413, "body_too_large", "invalid"),  # by its declared size
    (AUTH, body_of(b'{"n": 1}'), 415, "unsupported_media_type", "invalid"),
    ([*AUTH, *JSON], body_of(b'{"n": 0}'), 422, "invalid_request", "invalid"),
    ([*AUTH, *JSON], body_of(b'{"n": 1'), 422, "invalid_request", "invalid"),
    ([*AUTH, *JSON], body_of(b'{"n": 1}'), 503, "not_ready", "rejected"),  # valid: readiness comes next
])
def test_each_check_answers_with_its_status_and_the_reason_of_its_error(
        headers: Headers, read: Any, status: int, type_: str, reason: str) -> None:
    reply, log = answer(handler(), headers, read)
    assert (reply.status, error(reply)["type"], log.reason) == (status, type_, reason)
    assert reply.headers[0] == (b"content-type", b"application/json")


def test_a_body_still_arriving_at_the_deadline_is_a_504_counted_from_arrival() -> None:
    h = handler(request_timeout_s=0.2)
    arrived = time.monotonic() - 0.15  # the headers came 150 ms ago: 50 ms are left for the body
    started = time.monotonic()
    reply, log = answer(h, [*AUTH, *JSON], body_of(b'{"n": 1}', delay=5), started=arrived)
    assert time.monotonic() - started < 1
    assert (reply.status, error(reply)["type"], log.reason) == (504, "deadline_exceeded", "timeout")


def test_a_client_gone_mid_body_is_cancelled() -> None:
    async def gone(limit: int) -> bytes:
        raise Cancelled("the client disconnected before sending the whole body")

    reply, log = answer(handler(), [*AUTH, *JSON], gone)
    assert (reply.status, log.reason, log.fields["status_note"]) == (499, "cancelled", "client disconnected")


def test_a_bug_is_a_500_with_reason_error() -> None:
    async def broken(limit: int) -> bytes:
        raise RuntimeError("injected")

    reply, log = answer(handler(), [*AUTH, *JSON], broken)
    assert (reply.status, error(reply)["type"], log.reason) == (500, "internal", "error")


def test_begin_and_end_account_for_the_request() -> None:
    h = handler()
    log = h.begin([(b"x-request-id", b"abc-1")], time.monotonic())
    assert h.state.in_flight == 1 and log.request_id == "abc-1"
    log.reason = "invalid"
    h.end(log, 422)
    assert h.state.in_flight == 0
    registry = h.state.metrics.registry
    labels = {"model": "unknown", "reason": "invalid"}
    assert registry.get_sample_value("cmserve_request_failures_total", labels) == 1


@pytest.mark.parametrize(("content_type", "json"), [
    ("application/json", True), ("application/json; charset=utf-8", True), ("APPLICATION/JSON", True),
    ("application/vnd.cmserve+json", True), ("text/plain", False), ("application/jsonx", False), (None, False),
])
def test_json_content_types(content_type: str | None, json: bool) -> None:
    assert is_json(content_type) is json


def test_parse_request_names_the_field_and_accepts_a_byte_order_mark() -> None:
    assert parse_request(b'\xef\xbb\xbf{"n": 2}', "application/json").n == 2
    with pytest.raises(InvalidRequest) as e:
        parse_request(b'{"n": 2, "steps": 0}', "application/json")
    assert e.value.field == "steps" and e.value.message.startswith("steps:")
    with pytest.raises(UnsupportedMediaType, match="had no Content-Type"):
        parse_request(b'{"n": 2}', None)
    with pytest.raises(InvalidRequest):  # an empty body is a JSON mistake, whatever its type
        parse_request(b"", None)


def test_the_drain_waits_only_for_requests_admitted_before_it() -> None:
    """A request admitted (past the readiness check) counts until its end; one refused while draining never counts,
    so clients that keep sending cannot hold the drain up."""
    h = handler()
    h.state.ready = True
    log = h.begin([*AUTH, *JSON], time.monotonic())

    async def run(log: RequestLog) -> Reply:
        return await h.answer(log, [*AUTH, *JSON], body_of(b'{"n": 1}'), no_watch)

    reply = asyncio.run(run(log))
    assert reply.status == 404 and log.admitted and h.state.admitted == 1  # no model served: admitted, then 404
    h.end(log, reply.status)
    assert h.state.admitted == 0
    h.state.begin_drain()
    refused, log = answer(h, [*AUTH, *JSON], body_of(b'{"n": 1}'))
    assert (refused.status, error(refused)["type"], log.admitted, h.state.admitted) == (503, "draining", False, 0)
