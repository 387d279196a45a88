"""RequestContext (service/api/middleware.py): every request but POST /v1/generate gets its id and log line here;
generate requests only their arrival time (their handler does the rest)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from service.api.middleware import RequestContext
from service.api.requests import ARRIVED_KEY


def call(path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None,
         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seen: dict[str, Any] = {}
    sent: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method, "headers": headers or []}
    asyncio.run(RequestContext(app)(scope, None, send))
    return seen, sent


def test_a_request_gets_an_id_header_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cmserve.access"):
        scope, sent = call("/v1/models", headers=[(b"x-request-id", b"abc-1")])
    assert (b"x-request-id", b"abc-1") in sent[0]["headers"]
    assert ARRIVED_KEY in scope
    (record,) = [r for r in caplog.records if r.name == "cmserve.access"]
    assert record.fields["request_id"] == "abc-1" and record.fields["status"] == 204  # type: ignore[attr-defined]


def test_an_insane_request_id_is_replaced() -> None:
    _, sent = call("/v1/models", headers=[(b"x-request-id", b"a b\x01")])
    (value,) = [v for k, v in sent[0]["headers"] if k == b"x-request-id"]
    assert len(value) == 32 and value != b"a b\x01"


def test_generate_requests_are_left_to_their_handler(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cmserve.access"):
        scope, sent = call("/v1/generate", method="POST")
    assert ARRIVED_KEY in scope  # its deadline counts from here
    assert sent[0]["headers"] == [] and not [r for r in caplog.records if r.name == "cmserve.access"]
