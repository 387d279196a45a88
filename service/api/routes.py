"""The HTTP routes: thin. They validate, call the scheduler and encoder, and shape responses."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.types import Receive

from ..encode import MIME
from ..errors import Cancelled, DeadlineExceeded, InvalidRequest, ServiceError
from ..registry import ServedModel
from ..scheduler import Job
from ..schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelInfo,
    ModelsResponse,
    ReadyResponse,
    StatsResponse,
)
from ..state import ServiceState
from .errors import CLIENT_CLOSED_REQUEST, error_response
from .middleware import RequestLog, request_log
from .negotiate import choose_representation
from .security import ApiKeys, RateLimiter

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
_seeds = random.Random()  # seeds need not be secret: this is fast, and seeded from os.urandom
NO_CACHE = {"Cache-Control": "no-store"}
DISCONNECT_WATCH_S = 0.05  # a request's client is watched for a disconnect from this long after submission
_STRING = json.encoder.encode_basestring_ascii  # a str as json writes it by default (quoted, ASCII)


async def get_state(request: Request) -> ServiceState:  # async: a sync dependency would hop to a thread
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


async def require_api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """Bearer key check (when CM_API_KEYS is set) and the per-key rate limit."""
    keys: ApiKeys = request.app.state.api_keys
    limiter: RateLimiter = request.app.state.rate_limiter
    key = keys.check(authorization)
    limiter.check(key)
    return key


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON with base64 images; or, with `Accept: image/png` (jpeg, webp) and n = 1, the raw "
        "image with its seed and schedule in the X-Seed, X-Sigmas and X-Class-Label headers",
        "content": {mime: {"schema": {"type": "string", "format": "binary"}} for mime in MIME.values()},
    },
    **_errors(401, 404, 406, 413, 415, 422, 429, 500, 503, 504),
}


async def generate(body: GenerateRequest, request: Request) -> Response:
    """Sample n images with one network evaluation per step, batched with other requests' images."""
    state: ServiceState = request.app.state.service  # not a dependency: resolving one costs ~0.1 ms a request
    return await respond(state, body, request.headers.get("accept"), request_log(request.scope),
                         asgi_disconnect_watch(request.receive))


# watch(on_disconnect) arranges for on_disconnect() to be called if the client goes away; it returns `unwatch`.
DisconnectWatch = Callable[[Callable[[], None]], Callable[[], None]]


def asgi_disconnect_watch(receive: Receive) -> DisconnectWatch:
    """Watches an ASGI request's `receive` (its body read: it only reports a disconnect), from
    DISCONNECT_WATCH_S on: a watcher task costs the event loop ~14 µs a request, an eighth of its work per request
    on the CPU (BENCHMARKS.md), and most requests are answered before then. A client that left earlier is
    noticed at that time, when a longer request's remaining images are still queued."""

    def watch(on_disconnect: Callable[[], None]) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[None] | None = None

        def start() -> None:
            nonlocal watcher
            watcher = loop.create_task(_disconnected(receive))
            watcher.add_done_callback(lambda task: task.cancelled() or on_disconnect())

        later = loop.call_later(DISCONNECT_WATCH_S, start)

        def unwatch() -> None:
            later.cancel()
            if watcher is not None:
                watcher.cancel()

        return unwatch

    return watch


async def respond(state: ServiceState, body: GenerateRequest, accept: str | None, log: RequestLog,
                  watch: DisconnectWatch) -> Response:
    """The work of POST /v1/generate for a validated body, shared by the route, the ASGI fast path (fastpath.py)
    and the HTTP protocol (protocol.py), each of which says how it learns of a disconnect (`watch`)."""
    state.check_ready()
    served = state.registry.get(body.model)
    log.model = served.name
    settings = state.settings
    if body.n > settings.max_images_per_request:
        raise InvalidRequest(
            f"n must be 1…{settings.max_images_per_request} (CM_MAX_IMAGES_PER_REQUEST), got {body.n}", field="n"
        )
    raw_format = choose_representation(accept, body.format, "format" in body.model_fields_set, body.n)
    sigmas = served.resolve_sigmas(body.steps, body.sigmas)
    label = served.resolve_class_label(body.class_label)
    seed = _seeds.getrandbits(63) if body.seed is None else body.seed
    log.fields.update(n=body.n, steps=len(sigmas), seed=seed)

    job = served.make_job(seed=seed, n=body.n, sigmas=sigmas, class_label=label,
                          deadline=log.started + settings.request_timeout_s)
    try:
        await _run_job(state, job, watch)
    except Cancelled:
        log.fields["status_note"] = "client disconnected"
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    fmt = raw_format or body.format
    encoded, encode_s = await state.encoder.encode(job.images, fmt)  # type: ignore[union-attr]
    state.metrics.observe_encode(fmt, encode_s)
    timings = _timings_ms(job, encode_s, log.started)
    log.fields["timings_ms"] = timings
    labels = job.class_labels
    if raw_format is not None:
        return _raw_image(encoded[0], raw_format, served, seed, sigmas, labels[0])
    return _json_images(encoded, fmt, served, seed, sigmas, labels, timings)


async def _run_job(state: ServiceState, job: Job, watch: DisconnectWatch) -> None:
    """Queue the job and wait for it, racing the client's disconnect and the deadline."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[str | None] = loop.create_future()  # None: the job ended; else why we stopped waiting
    job.on_done = lambda _: loop.call_soon_threadsafe(_resolve, ended, None)
    state.scheduler.submit(job)
    unwatch = watch(lambda: _resolve(ended, "disconnect"))
    timer = loop.call_later(job.deadline - time.monotonic(), _resolve, ended, "deadline")
    try:
        why = await ended
    finally:
        timer.cancel()
        unwatch()
    if why is not None:
        error: ServiceError = Cancelled("the client disconnected") if why == "disconnect" else DeadlineExceeded(
            f"the request took longer than {state.settings.request_timeout_s:g} s (CM_REQUEST_TIMEOUT_S); its "
            "remaining images were dropped")
        state.scheduler.cancel(job, error)  # False if it finished meanwhile: then its result stands
    if job.error is not None:
        raise job.error


def _resolve(future: asyncio.Future[str | None], why: str | None) -> None:
    if not future.done():
        future.set_result(why)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read, so receive() only reports that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _timings_ms(job: Job, encode_s: float, arrived: float) -> dict[str, float]:
    started = job.started_at or job.submitted_at
    finished = job.finished_at or started
    return {
        "queue": round((started - job.submitted_at) * 1000, 3),
        "compute": round((finished - started) * 1000, 3),
        "encode": round(encode_s * 1000, 3),
        "total": round((time.monotonic() - arrived) * 1000, 3),
    }


def _json_images(
    encoded: list[bytes], fmt: str, served: ServedModel, seed: int, sigmas: list[float],
    labels: list[int | None], timings: dict[str, float],
) -> Response:
    return JsonBody(json_body(served.name, int(time.time()), seed, sigmas, MIME[fmt], encoded, labels, timings))


class JsonBody(Response):
    """A 200 with a JSON body already written: Response without its __init__, which renders the content and
    builds the headers through a header object (a few µs a request); the same status, headers and body."""

    media_type = "application/json"

    def __init__(self, text: str) -> None:  # (Response.__init__ not called: its work is done here)
        self.status_code = 200
        self.background = None
        self.body = text.encode()
        self.raw_headers = [(b"content-length", str(len(self.body)).encode()), (b"content-type", b"application/json")]


def json_body(model: str, created: int, seed: int, sigmas: list[float], mime: str, encoded: list[bytes],
              labels: list[int | None], timings: dict[str, float]) -> str:
    """The GenerateResponse JSON, compact, written from a template: the text `json` writes for the same document
    (a test compares them) in about half its time (2.9 against 5.1 µs for one image), which counts at
    thousands of requests per second on the CPU."""
    quoted_mime = _STRING(mime)
    images = []
    for i, data in enumerate(encoded):
        label = labels[i]
        images.append(f'{{"index":{i:d},"seed":{seed + i:d},"class_label":{"null" if label is None else int(label)},'
                      f'"mime":{quoted_mime},"b64":"{base64.b64encode(data).decode()}"}}')
    return (f'{{"model":{_STRING(model)},"created":{created:d},"seed":{seed:d},'
            f'"sigmas":[{",".join(map(repr, map(float, sigmas)))}],"images":[{",".join(images)}],'
            f'"timings_ms":{{"queue":{float(timings["queue"])!r},"compute":{float(timings["compute"])!r},'
            f'"encode":{float(timings["encode"])!r},"total":{float(timings["total"])!r}}}}}')


def _raw_image(
    data: bytes, fmt: str, served: ServedModel, seed: int, sigmas: list[float], label: int | None
) -> Response:
    headers = {"X-Model": served.name, "X-Seed": str(seed), "X-Sigmas": ",".join(repr(s) for s in sigmas)}
    if label is not None:
        headers["X-Class-Label"] = str(label)
    return Response(data, media_type=MIME[fmt], headers=headers)


async def list_models(state: State) -> ModelsResponse:
    """The loaded models: image shape, classes, σ range and the recommended schedule for each step count."""
    return ModelsResponse(
        default_model=state.registry.default,
        models=[_model_info(m, state) for m in state.registry],
    )


def _model_info(served: ServedModel, state: ServiceState) -> ModelInfo:
    cfg = served.config
    return ModelInfo(
        name=served.name,
        default=served.name == state.registry.default,
        preset=served.meta.preset,
        image_shape=list(cfg.image_shape),
        num_classes=cfg.num_classes,
        class_names=served.class_names,
        sigma_min=cfg.sigma_min,
        sigma_max=cfg.sigma_max,
        recommended_schedules={str(k): v for k, v in served.schedules.items()},
        max_steps=served.max_steps,
        max_images_per_request=state.settings.max_images_per_request,
        checkpoint_sha256=served.sha256,
        training_step=served.meta.training_step,
    )


async def stats(state: State) -> StatsResponse:
    """Recent request and image rates, queue depth, mean images per evaluation; from the /metrics objects."""
    return StatsResponse(**state.metrics.stats(ready=state.ready))


async def healthz() -> Response:
    """200 while the process serves HTTP, whatever the load (never needs a key)."""
    return Response('{"status":"ok"}', media_type="application/json", headers=NO_CACHE)


async def readyz(state: State) -> Response:
    """200 once every model is loaded and every batch bucket warmed up; 503 before that and while draining."""
    body = ReadyResponse(ready=state.ready, status=state.status).model_dump_json()
    return Response(body, status_code=200 if state.ready else 503, media_type="application/json", headers=NO_CACHE)


async def metrics(state: State) -> Response:
    """Prometheus text exposition (never needs a key)."""
    body, content_type = state.metrics.exposition()
    return Response(body, media_type=content_type)


async def index() -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return error_response(404, "not_found", "the playground is not installed")
    return FileResponse(page, media_type="text/html")


def install_routes(app: FastAPI, guarded: bool) -> None:
    """Add the routes to the app itself (an included APIRouter costs an extra route-matching pass per request).

    `guarded`: API keys or a rate limit are configured, so /v1/generate checks them (and documents the
    Authorization header); without either it runs no dependency at all.
    """
    app.add_api_route(
        "/v1/generate", generate, methods=["POST"], response_model=GenerateResponse, responses=GENERATE_RESPONSES,
        summary="Generate images", dependencies=[Depends(require_api_key)] if guarded else None,
    )
    app.add_api_route(
        "/v1/models", list_models, methods=["GET"], response_model=ModelsResponse, summary="Served models"
    )
    app.add_api_route(
        "/v1/stats", stats, methods=["GET"], response_model=StatsResponse, summary="Live summary for the playground"
    )
    app.add_api_route("/healthz", healthz, methods=["GET"], response_model=HealthResponse, summary="Liveness")
    app.add_api_route(
        "/readyz", readyz, methods=["GET"], response_model=ReadyResponse, summary="Readiness",
        responses={503: {"model": ReadyResponse, "description": "Loading, draining, or start-up failed"}},
    )
    app.add_api_route(
        "/metrics", metrics, methods=["GET"], summary="Prometheus metrics", response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
