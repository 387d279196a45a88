"""The HTTP API in-process (httpx against the ASGI app, lifespan running): responses, errors, limits, faults.

Reliability acceptance tests here: 5 (body cap), 6 (fuzzing the OpenAPI contract), 7 (queue bound),
8 (deadline), 9 (disconnect), 10 (injected OOM), 12 (readiness), 13 (exposure). The same behaviour
against a real `python -m service` process is in test_server_process.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount

from service.api import routes
from service.schemas import ErrorResponse, GenerateResponse, ModelsResponse, StatsResponse
from service.settings import Settings
from tests.integration.conftest import (
    CLASS_NAMES,
    Gate,
    OOMAboveEngine,
    app_settings,
    decode,
    decode_b64,
    gated,
    metric,
    metric_samples,
    reference_images,
    running_app,
)

pytestmark = pytest.mark.anyio

KEY = "k" * 24
ALLOWED_ROUTES = {
    ("POST", "/v1/generate"),
    ("POST", "/v1/edit"),
    ("GET", "/v1/models"),
    ("GET", "/v1/stats"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("MOUNT", "/static"),
}
METRIC_NAMES = [  # docs/serving.md
    "cmserve_requests_total", "cmserve_request_failures_total", "cmserve_request_duration_seconds_count",
    "cmserve_queue_wait_seconds_count", "cmserve_forward_duration_seconds_count", "cmserve_batch_size_count",
    "cmserve_forward_passes_total", "cmserve_images_generated_total", "cmserve_encode_duration_seconds_count",
    "cmserve_queue_depth", "cmserve_requests_in_progress", "cmserve_model_info", "cmserve_ready",
    "cmserve_build_info",
]


def error_of(response: httpx.Response, status: int, type_: str, field: str | None = None) -> str:
    """Check the error shape; return its message."""
    assert response.status_code == status, response.text
    body = ErrorResponse.model_validate(response.json())
    assert body.error.type == type_
    assert body.error.field == field
    return body.error.message


async def metrics_of(client: httpx.AsyncClient) -> dict:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return metric_samples(response.text)


async def until(predicate: Any, client: httpx.AsyncClient, timeout: float = 30.0) -> dict:
    """Poll /metrics until `predicate(samples)` holds."""
    async with asyncio.timeout(timeout):
        while True:
            samples = await metrics_of(client)
            if predicate(samples):
                return samples
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------- generating


async def test_objects_alive_at_ready_are_frozen_out_of_the_collector(tiny_checkpoint: Path) -> None:
    """Full collections would walk torch, the app and the models: 150 ms pauses under load without this."""
    import gc

    async with running_app(app_settings({"tiny": tiny_checkpoint})):
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0  # the lifespan's end hands them back


async def test_generate_json_is_exactly_models_sampling(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        response = await client.post("/v1/generate", json={"n": 3, "steps": 2, "seed": 1234})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        doc = GenerateResponse.model_validate(response.json())
    assert (doc.model, doc.seed, doc.sigmas) == ("tiny", 1234, [80.0, 0.821])
    expected = reference_images(tiny_checkpoint, 1234, 3, doc.sigmas)
    for i, image in enumerate(doc.images):
        assert (image.index, image.seed, image.mime) == (i, 1234 + i, "image/png")
        np.testing.assert_array_equal(decode_b64(image.b64), expected[i])
    assert set(doc.timings_ms.model_dump()) == {"queue", "compute", "encode", "total"}


async def test_a_json_body_whole_chunked_or_of_a_json_type_is_answered_and_others_get_errors(
        tiny_checkpoint: Path) -> None:
    """The handler reads the body itself: sent whole or chunked, as application/json or application/*+json, for
    JSON or a raw image; an invalid body is a 422 naming the field, a body not sent as JSON a 415."""
    body = {"n": 2, "steps": 2, "seed": 77}
    text = json.dumps(body).encode()
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):

        async def chunked() -> Any:
            yield text[:5]
            yield text[5:]

        whole = await client.post("/v1/generate", json=body)
        streamed = await client.post("/v1/generate", content=chunked(), headers={"content-type": "application/json"})
        vendor = await client.post("/v1/generate", content=text,
                                   headers={"content-type": "application/vnd.cmserve+json; charset=utf-8"})
        bom = await client.post("/v1/generate", content=b"\xef\xbb\xbf" + text,
                                headers={"content-type": "application/json"})
        raw = await client.post("/v1/generate", json={"seed": 77}, headers={"accept": "image/png"})
        invalid = await client.post("/v1/generate", json={"n": 0})
        untyped = await client.post("/v1/generate", content=text)
        plain = await client.post("/v1/generate", content=text, headers={"content-type": "text/plain"})
    expected = reference_images(tiny_checkpoint, 77, 2, [80.0, 0.821])
    for response in (whole, streamed, vendor, bom):
        assert response.status_code == 200, response.text
        for i, image in enumerate(response.json()["images"]):
            np.testing.assert_array_equal(decode_b64(image["b64"]), expected[i])
    assert raw.status_code == 200 and raw.headers["x-seed"] == "77"
    np.testing.assert_array_equal(decode(raw.content), reference_images(tiny_checkpoint, 77, 1, [80.0])[0])
    assert error_of(invalid, 422, "invalid_request", "n").startswith("n:")
    assert "(the request had no Content-Type)" in error_of(untyped, 415, "unsupported_media_type")
    assert "Content-Type: application/json" in error_of(plain, 415, "unsupported_media_type")


async def test_a_bug_is_a_json_500_with_the_request_id_and_serving_goes_on(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The generate handler answers its own unexpected errors as FastAPI's server-error layer does the others'."""
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (app, client):
        service = app.state.service
        real_get, real_exposition = service.registry.get, service.metrics.exposition

        def broken(*args: Any) -> Any:
            raise RuntimeError("injected bug")

        service.registry.get = service.metrics.exposition = broken
        with caplog.at_level(logging.ERROR, logger="cmserve.api"):
            fast = await client.post("/v1/generate", json={"n": 1})  # the generate handler
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # Starlette re-raises after its 500
            async with httpx.AsyncClient(transport=transport, base_url="http://cmserve") as plain:
                routed = await plain.get("/metrics")  # FastAPI's route, its server-error layer
        service.registry.get, service.metrics.exposition = real_get, real_exposition
        after = await client.post("/v1/generate", json={"n": 1})
        samples = await metrics_of(client)
    for response in (fast, routed):
        assert "request id" in error_of(response, 500, "internal")
        assert len(response.headers["x-request-id"]) == 32
    logged = [r for r in caplog.records if r.name == "cmserve.api" and r.exc_info]
    assert [r.getMessage() for r in logged] == [
        "unhandled error in POST /v1/generate", "unhandled error in GET /metrics"]
    assert all("injected bug" in str(r.exc_info[1]) for r in logged)  # type: ignore[index]
    assert after.status_code == 200
    assert metric(samples, "cmserve_requests_total", model="unknown", code="500") == 1
    assert metric(samples, "cmserve_request_failures_total", model="unknown", reason="error") == 1


async def test_seed_class_label_and_format(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        drawn = (await client.post("/v1/generate", json={"n": 2})).json()
        again = (await client.post("/v1/generate", json={"n": 2, "seed": drawn["seed"]})).json()
        by_index = (await client.post("/v1/generate", json={"seed": 5, "class_label": 7, "format": "webp"})).json()
        by_name = (await client.post("/v1/generate", json={"seed": 5, "class_label": "7", "format": "webp"})).json()
        jpeg = (await client.post("/v1/generate", json={"seed": 5, "format": "jpeg"})).json()
    assert 0 <= drawn["seed"] < 2**63 and again["images"] == drawn["images"]  # the echoed seed reproduces them
    labels = [image["class_label"] for image in drawn["images"]]
    assert all(0 <= label < 10 for label in labels)
    np.testing.assert_array_equal(
        decode_b64(drawn["images"][1]["b64"]), reference_images(tiny_checkpoint, drawn["seed"], 2, [80.0])[1]
    )
    assert by_index["images"][0]["class_label"] == 7 and by_index["images"] == by_name["images"]
    assert by_index["images"][0]["mime"] == "image/webp"
    webp = decode_b64(by_index["images"][0]["b64"])  # WebP has no grey mode: lossless RGB with R = G = B
    expected = reference_images(tiny_checkpoint, 5, 1, [80.0], labels=[7])[0]
    np.testing.assert_array_equal(webp, np.repeat(expected, 3, axis=2))
    assert jpeg["images"][0]["mime"] == "image/jpeg" and decode_b64(jpeg["images"][0]["b64"]).shape[:2] == (8, 8)


async def test_explicit_sigmas_and_recommended_schedules(tiny_checkpoint: Path, unconditional_checkpoint: Path) -> None:
    models = {"tiny": tiny_checkpoint, "plain": unconditional_checkpoint}
    async with running_app(app_settings(models)) as (_, client):
        explicit = (await client.post("/v1/generate", json={"seed": 3, "sigmas": [40.0, 2.0, 0.3]})).json()
        recommended = (await client.post("/v1/generate", json={"model": "plain", "seed": 3, "steps": 2})).json()
        listing = ModelsResponse.model_validate((await client.get("/v1/models")).json())
    assert explicit["sigmas"] == [40.0, 2.0, 0.3]
    np.testing.assert_array_equal(
        decode_b64(explicit["images"][0]["b64"]), reference_images(tiny_checkpoint, 3, 1, [40.0, 2.0, 0.3])[0]
    )
    assert recommended["sigmas"] == [80.0, 0.5] and recommended["images"][0]["class_label"] is None
    assert listing.default_model == "tiny"
    tiny, plain = listing.models
    assert (tiny.name, tiny.default, tiny.num_classes, tiny.class_names, tiny.image_shape) == (
        "tiny", True, 10, CLASS_NAMES, [1, 8, 8]
    )
    assert tiny.training_step == 7 and len(tiny.checkpoint_sha256) == 64 and tiny.max_steps == 8
    assert plain.recommended_schedules["2"] == [80.0, 0.5] and plain.recommended_schedules["1"] == [80.0]
    assert sorted(plain.recommended_schedules, key=int) == [str(k) for k in range(1, 9)]


async def test_raw_image_with_accept_header(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        raw = await client.post("/v1/generate", json={"seed": 11, "steps": 2}, headers={"Accept": "image/png"})
        as_json = (await client.post("/v1/generate", json={"seed": 11, "steps": 2})).json()
        webp = await client.post("/v1/generate", json={"seed": 11}, headers={"Accept": "image/webp"})
        many = await client.post("/v1/generate", json={"n": 2}, headers={"Accept": "image/png"})
        nothing = await client.post("/v1/generate", json={}, headers={"Accept": "text/html"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert raw.headers["x-seed"] == "11" and raw.headers["x-sigmas"] == "80.0,0.821"
    assert raw.headers["x-class-label"] == str(as_json["images"][0]["class_label"])
    assert raw.content == base64.b64decode(as_json["images"][0]["b64"])
    assert webp.headers["content-type"] == "image/webp"
    np.testing.assert_array_equal(decode(webp.content)[..., :1], reference_images(tiny_checkpoint, 11, 1, [80.0])[0])
    assert "only available for n = 1" in error_of(many, 406, "not_acceptable", "n")
    error_of(nothing, 406, "not_acceptable")


# ---------------------------------------------------------------------- errors a client can cause


@pytest.mark.parametrize(
    ("body", "status", "type_", "field", "text"),
    [
        ({"n": 65}, 422, "invalid_request", "n",
         "n must be 1…64 for model 'tiny' (8×8 images; CM_MAX_IMAGES_PER_REQUEST sets it for every model), got 65"),
        ({"n": 0}, 422, "invalid_request", "n", "greater than or equal to 1"),
        ({"steps": 9}, 422, "invalid_request", "steps", "steps must be 1…8 (CM_MAX_STEPS), got 9"),
        ({"sigmas": [1.0, 2.0]}, 422, "invalid_request", "sigmas", "strictly decreasing"),
        ({"sigmas": [81.0]}, 422, "invalid_request", "sigmas", "exceeds sigma_max = 80.0"),
        ({"sigmas": [1.0, 0.002]}, 422, "invalid_request", "sigmas", "> sigma_min = 0.002"),
        ({"sigmas": [9.0, 8, 7, 6, 5, 4, 3, 2, 1]}, 422, "invalid_request", "sigmas", "at most 8 steps"),
        ({"steps": 2, "sigmas": [2.0]}, 422, "invalid_request", "sigmas", "either steps or sigmas"),
        ({"class_label": 10}, 422, "invalid_request", "class_label", "class_label must be 0…9"),
        ({"class_label": "cat"}, 422, "invalid_request", "class_label", "'cat' is not one of ['0', '1'"),
        ({"model": "plain", "class_label": 1}, 422, "invalid_request", "class_label", "is unconditional"),
        ({"model": "nope"}, 404, "unknown_model", "model", "unknown model 'nope'; served models: ['plain', 'tiny']"),
        ({"seed": -5}, 422, "invalid_request", "seed", "greater than or equal to 0"),
        ({"format": "bmp"}, 422, "invalid_request", "format", "'png', 'jpeg' or 'webp'"),
        ({"colour": "red"}, 422, "invalid_request", "colour", "unknown field"),
        ([1, 2], 422, "invalid_request", None, "must be a JSON object"),
    ],
)
async def test_invalid_requests_name_the_field(
    tiny_checkpoint: Path, unconditional_checkpoint: Path, body: Any, status: int, type_: str, field: str | None,
    text: str,
) -> None:
    models = {"tiny": tiny_checkpoint, "plain": unconditional_checkpoint}
    async with running_app(app_settings(models)) as (_, client):
        response = await client.post("/v1/generate", json=body)
        assert text in error_of(response, status, type_, field)
        samples = await metrics_of(client)
    assert sum(v for (n, labels), v in samples.items()
               if n == "cmserve_request_failures_total" and ("reason", "invalid") in labels) == 1


async def test_body_that_is_not_json(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        broken = await client.post("/v1/generate", content=b'{"n": 1', headers={"content-type": "application/json"})
        form_type = {"content-type": "application/x-www-form-urlencoded"}
        form = await client.post("/v1/generate", content=b"n=1", headers=form_type)
        empty = await client.post("/v1/generate", json=None)
    assert "request body is not valid JSON" in error_of(broken, 422, "invalid_request")
    assert "Content-Type: application/json" in error_of(form, 415, "unsupported_media_type")
    assert response_is_error(empty, 422)


def response_is_error(response: httpx.Response, status: int) -> bool:
    return response.status_code == status and ErrorResponse.model_validate(response.json()) is not None


async def test_unknown_routes_and_methods_answer_json(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        missing = await client.get("/v1/nothing")
        wrong = await client.get("/v1/generate")
        load = await client.post("/v1/models", json={"path": "https://example.invalid/model.pt"})
    assert "no route GET /v1/nothing" in error_of(missing, 404, "not_found")
    error_of(wrong, 405, "method_not_allowed")
    error_of(load, 405, "method_not_allowed")  # there is no way to make the server load a model


async def test_body_cap_with_and_without_content_length(tiny_checkpoint: Path) -> None:
    """Reliability 5: 413 whether the size is declared or streamed, and the body is not read past the cap."""
    chunk = b" " * 8192
    sent = 0

    async def endless() -> Any:
        nonlocal sent
        for _ in range(2560):  # 20 MiB if anyone read it all
            sent += len(chunk)
            yield chunk

    async with running_app(app_settings({"tiny": tiny_checkpoint}, max_body_bytes=16384)) as (_, client):
        declared = await client.post("/v1/generate", content=b"{" + b" " * 20000 + b"}",
                                     headers={"content-type": "application/json"})
        streamed = await client.post("/v1/generate", content=endless(), headers={"content-type": "application/json"})
        fits = await client.post("/v1/generate", content=b'{"n": 1}' + b" " * 16000,
                                 headers={"content-type": "application/json"})
        samples = await metrics_of(client)
    assert "exceeds 16384 bytes (CM_MAX_BODY_BYTES)" in error_of(declared, 413, "body_too_large")
    error_of(streamed, 413, "body_too_large")
    assert sent <= 16384 + 2 * len(chunk)  # reading stopped right after the cap
    assert fits.status_code == 200
    assert metric(samples, "cmserve_requests_total", model="unknown", code="413") == 2


async def test_api_keys_guard_inference_only(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint}, api_keys=[KEY])) as (_, client):
        missing = await client.post("/v1/generate", json={})
        wrong = await client.post("/v1/generate", json={}, headers={"Authorization": "Bearer " + "x" * 24})
        right = await client.post("/v1/generate", json={}, headers={"Authorization": f"Bearer {KEY}"})
        open_paths = [(await client.get(p)).status_code for p in ("/healthz", "/readyz", "/metrics", "/v1/stats")]
    assert "Authorization: Bearer" in error_of(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "not valid" in error_of(wrong, 401, "unauthorized")
    assert right.status_code == 200 and open_paths == [200, 200, 200, 200]


async def test_rate_limit_per_key(tiny_checkpoint: Path) -> None:
    settings = app_settings({"tiny": tiny_checkpoint}, api_keys=[KEY], rate_limit_per_key=0.001)
    async with running_app(settings) as (_, client):
        headers = {"Authorization": f"Bearer {KEY}"}
        first = await client.post("/v1/generate", json={}, headers=headers)
        second = await client.post("/v1/generate", json={}, headers=headers)
    assert first.status_code == 200
    error_of(second, 429, "rate_limited")
    assert int(second.headers["retry-after"]) >= 1


# ---------------------------------------------------------------------- load, deadlines, disconnects, faults


async def test_queue_capacity_plus_one_is_503_with_retry_after(tiny_checkpoint: Path) -> None:
    """Reliability 7."""
    gate = Gate()
    settings = app_settings({"tiny": tiny_checkpoint}, max_batch=1, batch_buckets=[1], max_queue=4)
    async with running_app(settings, gated(gate)) as (_, client):
        gate.close()
        on_device = asyncio.create_task(client.post("/v1/generate", json={"seed": 1}))
        assert await asyncio.to_thread(gate.waiting.wait, 30)
        queued = asyncio.create_task(client.post("/v1/generate", json={"n": 4, "seed": 2}))
        await until(lambda s: metric(s, "cmserve_queue_depth", model="tiny") == 4, client)
        refused = await client.post("/v1/generate", json={"seed": 3})
        samples = await metrics_of(client)
        gate.open()
        done = await asyncio.gather(on_device, queued)
    assert "admits at most 4 (CM_MAX_QUEUE)" in error_of(refused, 503, "queue_full")
    assert int(refused.headers["retry-after"]) >= 1
    assert metric(samples, "cmserve_queue_depth", model="tiny") == 4
    assert metric(samples, "cmserve_request_failures_total", model="tiny", reason="rejected") == 1
    assert [r.status_code for r in done] == [200, 200] and len(done[1].json()["images"]) == 4


async def test_deadline_gives_504_and_expired_images_never_run(tiny_checkpoint: Path) -> None:
    """Reliability 8."""
    gate = Gate()
    settings = app_settings({"tiny": tiny_checkpoint}, max_batch=1, batch_buckets=[1], request_timeout_s=0.5)
    async with running_app(settings, gated(gate)) as (_, client):
        before = await metrics_of(client)
        gate.close()
        held = asyncio.create_task(client.post("/v1/generate", json={"seed": 1}))
        assert await asyncio.to_thread(gate.waiting.wait, 30)
        late = await client.post("/v1/generate", json={"n": 2, "seed": 2})  # waits behind the held evaluation
        gate.open()
        after_deadline = await held
        probe = await client.post("/v1/generate", json={"seed": 3})  # runs after the held evaluation ended
        samples = await metrics_of(client)
    assert "longer than 0.5 s (CM_REQUEST_TIMEOUT_S)" in error_of(late, 504, "deadline_exceeded")
    error_of(after_deadline, 504, "deadline_exceeded")
    assert probe.status_code == 200
    passes = metric(samples, "cmserve_forward_passes_total", model="tiny") - metric(
        before, "cmserve_forward_passes_total", model="tiny")
    assert passes == 2  # the held evaluation and the probe's: the late request's 2 images never ran
    assert metric(samples, "cmserve_images_generated_total", model="tiny") == 1  # the probe's image only
    assert metric(samples, "cmserve_request_failures_total", model="tiny", reason="timeout") == 2


async def test_client_disconnect_removes_its_images(tiny_checkpoint: Path) -> None:
    """Reliability 9: the route listens for http.disconnect and races it against the result."""
    gate = Gate()
    settings = app_settings({"tiny": tiny_checkpoint}, max_batch=1, batch_buckets=[1])
    async with running_app(settings, gated(gate)) as (app, client):
        before = await metrics_of(client)
        gate.close()
        gone = asyncio.Event()
        call = asyncio.create_task(asgi_post(app, b'{"n": 4, "steps": 2, "seed": 9}', gone))
        assert await asyncio.to_thread(gate.waiting.wait, 30)
        assert app.state.service.scheduler.queue_depth("tiny") == 3
        gone.set()  # the client hangs up
        status = (await call)[0]["status"]
        assert app.state.service.scheduler.queue_depth("tiny") == 0
        gate.open()
        assert (await client.post("/v1/generate", json={"seed": 1})).status_code == 200
        samples = await metrics_of(client)
    assert status == 499  # logged as "client closed request"; nothing reaches the client
    assert metric(samples, "cmserve_request_failures_total", model="tiny", reason="cancelled") == 1
    evaluated = metric(samples, "cmserve_batch_size_sum", model="tiny") - metric(before, "cmserve_batch_size_sum",
                                                                                 model="tiny")
    assert evaluated == 2  # the one image on the device when it left, and the probe: not 4 × 2


async def test_a_request_answered_in_time_never_watches_for_a_disconnect(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher task costs the event loop ~14 µs a request: one answered within DISCONNECT_WATCH_S reads its
    body and never listens for a disconnect."""
    monkeypatch.setattr(routes, "DISCONNECT_WATCH_S", 60.0)
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (app, _):
        calls: list[float] = []
        messages = await asgi_post(app, b'{"seed": 3}', asyncio.Event(), calls)  # the client stays
    assert messages[0]["status"] == 200
    assert len(calls) == 1  # the body only


async def test_a_request_that_waits_watches_for_a_disconnect_and_is_answered(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routes, "DISCONNECT_WATCH_S", 0.0)
    gate = Gate()
    async with running_app(app_settings({"tiny": tiny_checkpoint}), gated(gate)) as (app, _):
        gate.close()  # once warm
        calls: list[float] = []
        call = asyncio.create_task(asgi_post(app, b'{"seed": 3}', asyncio.Event(), calls))
        assert await asyncio.to_thread(gate.waiting.wait, 30)  # its image is held at the device
        for _ in range(3000):
            if len(calls) == 2:  # the body, then the watcher's wait for a disconnect
                break
            await asyncio.sleep(0.01)
        gate.open()
        messages = await call
        await asyncio.sleep(0)  # the cancelled watcher's last step
    assert len(calls) == 2
    assert messages[0]["status"] == 200


async def asgi_post(app: Any, body: bytes, disconnect: asyncio.Event,
                    calls: list[float] | None = None) -> list[dict[str, Any]]:
    """Call the app as a server would, with a client that disconnects when `disconnect` is set."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("cmserve", 80),
    }
    delivered = False
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if calls is not None:
            calls.append(time.monotonic())
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return messages


async def test_injected_oom_splits_batches_and_every_request_succeeds(tiny_checkpoint: Path) -> None:
    """Reliability 10."""
    OOMAboveEngine.instances.clear()
    settings = app_settings({"tiny": tiny_checkpoint})

    def factory(model: Any, **kwargs: Any) -> OOMAboveEngine:
        return OOMAboveEngine(model, limit=2, **kwargs)

    async with running_app(settings, factory) as (_, client):
        bodies = [{"n": 8, "steps": 2, "seed": 100}, *({"n": 2, "seed": s} for s in range(5))]
        responses = await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))
        ready = await client.get("/readyz")
        samples = await metrics_of(client)
    assert [r.status_code for r in responses] == [200] * len(bodies)
    big = responses[0].json()["images"]
    expected = reference_images(tiny_checkpoint, 100, 8, [80.0, 0.821])
    for i, image in enumerate(big):
        np.testing.assert_array_equal(decode_b64(image["b64"]), expected[i])
    (engine,) = OOMAboveEngine.instances
    assert engine.oom_splits > 0 and max(engine.sizes) <= 2
    assert ready.status_code == 200
    assert metric(samples, "cmserve_request_failures_total", model="tiny", reason="oom") == 0


async def test_oom_even_for_one_image_is_a_503_counted_as_oom(tiny_checkpoint: Path) -> None:
    """The failure reason comes from the error (OutOfMemory), not from the status code it shares with refusals."""
    def factory(model: Any, **kwargs: Any) -> OOMAboveEngine:
        return OOMAboveEngine(model, limit=0, **kwargs)

    async with running_app(app_settings({"tiny": tiny_checkpoint}), factory) as (_, client):
        response = await client.post("/v1/generate", json={"n": 2, "seed": 1})
        after = await client.post("/v1/generate", json={"n": 1, "seed": 2})
        samples = await metrics_of(client)
    assert error_of(response, 503, "out_of_memory") and response.headers["retry-after"] == "1"
    assert after.status_code == 503  # and serving goes on
    assert metric(samples, "cmserve_request_failures_total", model="tiny", reason="oom") == 2
    assert metric(samples, "cmserve_request_failures_total", model="tiny", reason="rejected") == 0


async def test_readiness_waits_for_warm_up_and_health_answers_throughout(tiny_checkpoint: Path) -> None:
    """Reliability 12."""
    gate = Gate(closed=True)  # warm-up itself waits at the gate
    async with running_app(app_settings({"tiny": tiny_checkpoint}), gated(gate), wait_ready=False) as (app, client):
        assert await asyncio.to_thread(gate.waiting.wait, 30)
        loading = await client.get("/readyz")
        health = await client.get("/healthz")
        refused = await client.post("/v1/generate", json={})
        samples = await metrics_of(client)
        gate.open()
        await app.state.service.wait_settled()
        ready = await client.get("/readyz")
        ready_metric = metric(await metrics_of(client), "cmserve_ready")
    assert loading.status_code == 503 and loading.json() == {"ready": False, "status": "loading"}
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    error_of(refused, 503, "not_ready")
    assert refused.headers["retry-after"] == "5"
    assert metric(samples, "cmserve_ready") == 0 and ready_metric == 1
    assert ready.status_code == 200 and ready.json() == {"ready": True, "status": "ready"}


async def test_draining_refuses_new_requests(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (app, client):
        app.state.service.begin_drain()
        ready = await client.get("/readyz")
        refused = await client.post("/v1/generate", json={})
        health = await client.get("/healthz")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    error_of(refused, 503, "draining")
    assert "retry-after" not in refused.headers and health.status_code == 200


async def test_a_broken_model_file_does_not_stop_the_others(tiny_checkpoint: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.ERROR, logger="cmserve.state"):
        async with running_app(app_settings({"broken": broken, "tiny": tiny_checkpoint})) as (_, client):
            models = (await client.get("/v1/models")).json()
            ok = await client.post("/v1/generate", json={})
    assert [m["name"] for m in models["models"]] == ["tiny"] and models["default_model"] == "tiny"
    assert ok.status_code == 200 and ok.json()["model"] == "tiny"
    assert any("model broken not served" in r.getMessage() and "broken.safetensors" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------- exposure, observability, contract


def test_route_list_is_the_allow_list(tiny_checkpoint: Path) -> None:
    """Reliability 13: nothing else is reachable; no route loads or changes a model; loopback by default."""
    from service.app import create_app

    app = create_app(app_settings({"tiny": tiny_checkpoint}))
    routes = set()
    for route in flat_routes(app.routes):
        if isinstance(route, Mount):
            routes.add(("MOUNT", route.path))
        else:
            routes.update((m, route.path) for m in route.methods - {"HEAD"})  # type: ignore[attr-defined]
    assert routes == ALLOWED_ROUTES
    posts = [r.path for r in flat_routes(app.routes) if isinstance(r, APIRoute) and "POST" in r.methods]
    assert posts == ["/v1/generate", "/v1/edit"]
    assert Settings().host == "127.0.0.1"


def test_fastapis_opentelemetry_only_with_cm_opentelemetry(tiny_checkpoint: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default (no per-request look for a provider); on, FastAPI instruments once a provider exists."""
    from opentelemetry import trace

    from service.app import create_app

    monkeypatch.setattr(trace, "get_tracer_provider", trace.NoOpTracerProvider)  # a configured provider
    off = create_app(app_settings({"tiny": tiny_checkpoint}))
    on = create_app(app_settings({"tiny": tiny_checkpoint}, opentelemetry=True))
    assert not off._native_telemetry.enabled()  # FastAPI's own switch (private: no public query)
    assert on._native_telemetry.enabled()


def flat_routes(routes: list[Any]) -> list[Any]:
    """Routes with included routers expanded (FastAPI wraps an included router in one entry)."""
    flat = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        flat.extend(flat_routes(inner.routes) if inner is not None else [route])
    return flat


async def test_metrics_exist_from_the_start_and_count_what_happened(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        start = await metrics_of(client)
        await client.post("/v1/generate", json={"n": 3, "steps": 2})
        await client.post("/v1/generate", json={"n": 2, "format": "webp"})
        await client.post("/v1/generate", json={"n": 0})
        end = await metrics_of(client)
        stats = StatsResponse.model_validate((await client.get("/v1/stats")).json())
    names = {name for name, _ in start}
    assert set(METRIC_NAMES) <= names
    assert not any(name.startswith("cmserve_gpu_") for name in names)  # absent on the CPU
    for reason in ("rejected", "timeout", "cancelled", "invalid", "oom", "error"):
        assert ("cmserve_request_failures_total", (("model", "tiny"), ("reason", reason))) in start
    assert metric(start, "cmserve_requests_total", model="tiny", code="200") == 0
    assert metric(start, "cmserve_ready") == 1 and metric(start, "cmserve_build_info", version="0.1.0") == 1
    assert metric(end, "cmserve_requests_total", model="tiny", code="200") == 2
    assert metric(end, "cmserve_requests_total", model="unknown", code="422") == 1
    assert metric(end, "cmserve_images_generated_total", model="tiny") == 5
    evals = metric(end, "cmserve_batch_size_sum", model="tiny") - metric(start, "cmserve_batch_size_sum", model="tiny")
    assert evals == 3 * 2 + 2
    assert metric(end, "cmserve_forward_passes_total", model="tiny") - metric(
        start, "cmserve_forward_passes_total", model="tiny") == 3
    assert metric(end, "cmserve_encode_duration_seconds_count", format="webp") == 1
    assert metric(end, "cmserve_request_duration_seconds_count", model="tiny") == 2
    model_info = [labels for name, labels in end if name == "cmserve_model_info"]
    assert len(model_info) == 1 and dict(model_info[0])["preset"] == "digits"
    assert stats.ready and stats.queue_depth == 0 and stats.in_progress == 0
    assert stats.mean_images_per_forward > 0


async def test_request_id_and_one_json_log_line_per_request(tiny_checkpoint: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        with caplog.at_level(logging.INFO, logger="cmserve.access"):
            echoed = await client.post("/v1/generate", json={"n": 2, "steps": 2}, headers={"X-Request-ID": "abc-123"})
            generated = await client.post("/v1/generate", json={"n": 0}, headers={"X-Request-ID": "bad id!"})
    assert echoed.headers["x-request-id"] == "abc-123"
    assert len(generated.headers["x-request-id"]) == 32 and generated.headers["x-request-id"] != "bad id"
    records = [r.fields for r in caplog.records if r.name == "cmserve.access"]  # type: ignore[attr-defined]
    assert len(records) == 2
    ok, bad = records
    assert (ok["request_id"], ok["model"], ok["n"], ok["steps"], ok["status"]) == ("abc-123", "tiny", 2, 2, 200)
    assert set(ok["timings_ms"]) == {"queue", "compute", "encode", "total"} and ok["duration_ms"] > 0
    assert bad["status"] == 422 and bad["request_id"] == generated.headers["x-request-id"]
    json.dumps(ok)  # every field is JSON


async def test_playground_is_served(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        page = await client.get("/")
        script = await client.get("/static/app.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert script.status_code == 200


async def test_openapi_documents_the_contract_with_examples(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        doc = (await client.get("/openapi.json")).json()
    generate = doc["paths"]["/v1/generate"]["post"]
    request_schema = doc["components"]["schemas"]["GenerateRequest"]
    assert request_schema["examples"] and set(request_schema["properties"]) == {
        "model", "n", "steps", "sigmas", "seed", "class_label", "format", "interpolate"}
    assert set(generate["responses"]) == {"200", "401", "404", "406", "408", "413", "415", "422", "429", "431", "500",
                                          "503", "504"}
    assert generate["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {"application/json", "image/png", "image/jpeg", "image/webp"} <= set(generate["responses"]["200"]["content"])
    assert "HTTPValidationError" not in doc["components"]["schemas"]


async def test_fuzzed_requests_never_get_a_5xx_and_match_the_schema(tiny_checkpoint: Path) -> None:
    """Reliability 6 (in the spirit of schemathesis, without the dependency): random bodies built from the
    schema's fields with valid and invalid values; every answer is documented and matches its schema."""
    rng = random.Random(6)
    values: dict[str, list[Any]] = {
        "model": ["tiny", "nope", "", 5, None, "x" * 100],
        "n": [1, 2, 64, 65, 0, -1, 1.5, "3", True, None, 10**20],
        "steps": [1, 2, 8, 9, 0, "2", None, 2.0],
        "sigmas": [[80.0], [80.0, 1.0], [1.0, 2.0], [], [float("inf")], [float("nan")], ["a"], 3, None, [80.0] * 70],
        "seed": [0, 2**63 - 1, 2**63, -1, "7", None, 1.5],
        "class_label": [0, 9, 10, -1, "3", "cat", None, 2.5, [1]],
        "format": ["png", "jpeg", "webp", "gif", None, 1],
        "extra": [1],
    }
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        for _ in range(150):
            body = {k: rng.choice(v) for k, v in values.items() if rng.random() < 0.4}
            body = {k: v for k, v in body.items() if v is not None or rng.random() < 0.5}
            accept = rng.choice([None, "application/json", "image/png", "image/*", "text/plain"])
            headers = {"Accept": accept} if accept else {}
            content = json.dumps(body).encode()  # allow_nan: Infinity and NaN are sent as such
            headers["Content-Type"] = "application/json"
            response = await client.post("/v1/generate", content=content, headers=headers)
            assert response.status_code in (200, 404, 406, 422), (body, response.text)
            if response.status_code == 200 and response.headers["content-type"] == "application/json":
                GenerateResponse.model_validate(response.json())
            elif response.status_code == 200:
                assert response.headers["content-type"].startswith("image/")
            else:
                ErrorResponse.model_validate(response.json())
