"""Assembles the FastAPI app: state, middleware, error handlers, routes, static files, lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .api.errors import install_error_handlers
from .api.fastpath import GenerateFastPath
from .api.middleware import BodyLimit, RequestContext
from .api.routes import STATIC_DIR, install_routes
from .api.security import ApiKeys, RateLimiter
from .engine import Engine
from .metrics import VERSION
from .registry import EngineFactory
from .settings import Settings
from .state import ServiceState

DESCRIPTION = """Consistency-model image generation. Requests are scheduled one network evaluation at a
time: images of every request share each batch, so a 1-step request never waits behind whole 4-step
ones. Errors are JSON `{"error": {"type", "message", "field"}}`."""


def create_app(settings: Settings | None = None, engine_factory: EngineFactory = Engine) -> FastAPI:
    """The ASGI app. The lifespan starts the engine thread and loads, then warms up, the models.

    One process answers /healthz (and /readyz 503) while it loads. A worker of several (CM_WORKERS > 1)
    instead finishes loading before uvicorn starts accepting on its socket, so it takes no connection
    before it is ready.
    """
    settings = settings or Settings()
    state = ServiceState(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        if settings.workers > 1:
            await state.wait_settled()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="cmserve",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.service = state
    app.state.api_keys = ApiKeys(settings.api_keys)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_key)
    install_error_handlers(app)
    install_routes(app, guarded=bool(settings.api_keys) or settings.rate_limit_per_key > 0)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(GenerateFastPath, state=state, api_keys=app.state.api_keys, rate_limiter=app.state.rate_limiter)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, state=state)  # added last = outermost: it sees every response
    return app
