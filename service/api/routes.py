"""The HTTP routes: thin. They validate, call the scheduler and encoder, and shape responses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.types import Receive, Scope

from ..encode import MIME
from ..errors import BodyTooLarge, Cancelled
from ..registry import ServedModel
from ..schemas import (
    EditRequest,
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
from .errors import error_response, to_response
from .generate import DisconnectWatch, GenerateHandler, ReadBody
from .requests import ARRIVED_KEY, READ_TIMED_OUT_KEY

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
NO_CACHE = {"Cache-Control": "no-store"}
DISCONNECT_WATCH_S = 0.05  # a request's client is watched for a disconnect from this long after submission


async def get_state(request: Request) -> ServiceState:  # async: a sync dependency would hop to a thread
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON with base64 images; or, with `Accept: image/png` (jpeg, webp) and n = 1, the raw "
        "image with its seed and schedule in the X-Seed, X-Sigmas and X-Class-Label headers",
        "content": {mime: {"schema": {"type": "string", "format": "binary"}} for mime in MIME.values()},
    },
    **_errors(401, 404, 406, 408, 413, 415, 422, 429, 431, 500, 503, 504),
}
AUTHORIZATION = {"name": "Authorization", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "Bearer API key (when the server has CM_API_KEYS)"}


async def generate(request: Request) -> Response:
    """Sample n images with one network evaluation per step, batched with other requests' images."""
    return await answer(request.app.state.generate, request)


async def edit(request: Request) -> Response:
    """Edit one image zero-shot (CM Algorithm 4): inpaint, superres, colorize or denoise; n samples, batched with
    generation's images in the same evaluations. Same conventions, limits, errors and response as /v1/generate."""
    return await answer(request.app.state.edit, request)


async def answer(handler: GenerateHandler, request: Request) -> Response:
    """A sampling request through its endpoint's handler: begin, answer, end (as protocol.py calls them)."""
    headers = request.scope["headers"]
    log = handler.begin(headers, request.scope[ARRIVED_KEY])
    status = 500
    try:
        reply = await handler.answer(log, headers, asgi_body(request.receive, request.scope),
                                     asgi_disconnect_watch(request.receive))
        status = reply.status
        reply.headers.append((b"x-request-id", log.request_id.encode()))
        return to_response(reply)
    finally:
        handler.end(log, status)


def asgi_body(receive: Receive, scope: Scope) -> ReadBody:
    """Reads an ASGI request's body, counting it against the cap as it streams in; the HTTP protocol marks the
    scope when the body takes longer than CM_READ_TIMEOUT_S (protocol.py)."""

    async def read(limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Cancelled("the client disconnected before sending the whole body")
            timed_out = scope.get(READ_TIMED_OUT_KEY)
            if timed_out is not None:
                raise timed_out
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    return read


def asgi_disconnect_watch(receive: Receive) -> DisconnectWatch:
    """Watches an ASGI request's `receive` (the body has been read: it only reports a disconnect), from
    DISCONNECT_WATCH_S on: most requests are answered before then, and a watcher task costs the event loop
    a noticeable share of a request's work. A client that left earlier is noticed then, while a longer
    request's remaining images are still queued."""

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


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


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
        max_images_per_request=served.max_images_per_request,
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


def _with_request_schema(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """FastAPI's document, with GenerateRequest and EditRequest among its schemas (no route declares them as
    parameters)."""

    def document() -> dict[str, Any]:
        doc = openapi()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (GenerateRequest, EditRequest):
            found = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
            for name, nested in found.pop("$defs", {}).items():
                schemas.setdefault(name, nested)
            schemas.setdefault(model.__name__, found)
        return doc

    return document


def _sampling_document(schema: str, guarded: bool) -> dict[str, Any]:
    """A sampling route's request body (its handler reads and validates it itself, generate.py), and its
    Authorization header when `guarded`."""
    body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}}
    return {**body, "parameters": [AUTHORIZATION]} if guarded else body


def install_routes(app: FastAPI, guarded: bool) -> None:
    """Add the routes to the app itself (an included APIRouter costs an extra route-matching pass per request).

    `guarded`: API keys or a rate limit are configured, so the document shows /v1/generate's Authorization header.
    """
    app.openapi = _with_request_schema(app.openapi)  # type: ignore[method-assign]
    app.add_api_route(
        "/v1/generate", generate, methods=["POST"], response_model=GenerateResponse, responses=GENERATE_RESPONSES,
        summary="Generate images", openapi_extra=_sampling_document("GenerateRequest", guarded),
    )
    app.add_api_route(
        "/v1/edit", edit, methods=["POST"], response_model=GenerateResponse, responses=GENERATE_RESPONSES,
        summary="Edit an image (inpaint, super-resolve, colorize, denoise)",
        openapi_extra=_sampling_document("EditRequest", guarded),
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
