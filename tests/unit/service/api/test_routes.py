"""How the FastAPI route hands a request to the generate handler (service/api/routes.py): the ASGI body reader and
the ASGI disconnect watch. The routes' answers themselves are tested over HTTP (tests/integration/test_api.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.api import routes
from service.api.routes import asgi_body, asgi_disconnect_watch
from service.errors import BodyTooLarge, Cancelled


def receiving(*messages: dict[str, Any], then_wait: bool = False) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if then_wait:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


def chunk(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


def test_the_body_is_read_whole_from_its_chunks() -> None:
    read = asgi_body(receiving(chunk(b'{"n"', True), chunk(b": 1}", False)), {})
    assert asyncio.run(read(100)) == b'{"n": 1}'


def test_a_streamed_body_over_the_cap_stops_being_read() -> None:
    read = asgi_body(receiving(chunk(b"x" * 60, True), chunk(b"x" * 60, True), chunk(b"never", False)), {})
    with pytest.raises(BodyTooLarge):
        asyncio.run(read(100))


def test_a_client_gone_before_the_end_of_its_body_is_cancelled() -> None:
    read = asgi_body(receiving(chunk(b'{"n"', True)), {})
    with pytest.raises(Cancelled):
        asyncio.run(read(100))


def test_the_disconnect_watch_starts_late_and_fires_on_a_disconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "DISCONNECT_WATCH_S", 0.01)

    async def run() -> list[str]:
        seen: list[str] = []
        asgi_disconnect_watch(receiving())(lambda: seen.append("gone"))
        await asyncio.sleep(0)
        assert seen == []  # not before DISCONNECT_WATCH_S
        await asyncio.sleep(0.05)
        return seen

    assert asyncio.run(run()) == ["gone"]


def test_a_request_answered_before_the_watch_starts_is_never_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "DISCONNECT_WATCH_S", 0.01)
    calls: list[str] = []

    async def receive() -> dict[str, Any]:
        calls.append("receive")
        return {"type": "http.disconnect"}

    async def run() -> None:
        unwatch = asgi_disconnect_watch(receive)(lambda: calls.append("gone"))
        unwatch()
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert calls == []
