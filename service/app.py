"""Assembles the FastAPI app: state, middleware, error handlers, routes, static files, lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from .api.edit import EDIT
from .api.errors import install_error_handlers
from .api.generate import GenerateHandler
from .api.middleware import RequestContext
from .api.routes import STATIC_DIR, install_routes
from .api.security import ApiKeys, RateLimiter
from .engine import Engine
from .frontend import FrontendState
from .metrics import VERSION
from .registry import EngineFactory
from .settings import Settings
from .state import ServiceState

DESCRIPTION = """Consistency-model image generation. Requests are scheduled one network evaluation at a
time: images of every request share each batch, so a 1-step request never waits behind whole 4-step
ones. Errors are JSON `{"error": {"type", "message", "field"}}`."""


def create_app(settings: Settings | None = None, engine_factory: EngineFactory = Engine,
               engine_address: str | None = None) -> FastAPI:
    """The ASGI app. The lifespan starts the engine thread and loads, then warms up, the models.

    One process answers /healthz (and /readyz 503) while it loads. A worker of several (CM_WORKERS > 1)
    instead finishes loading before uvicorn starts accepting on its socket, so it takes no connection
    before it is ready; so does a front end (CM_FRONTENDS > 1, `engine_address` set: the engine process's
    socket), until the engine process has described its loaded models.
    """
    settings = settings or Settings()
    state = ServiceState(settings, engine_factory) if engine_address is None else FrontendState(settings,
                                                                                               engine_address)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        if settings.workers > 1 or engine_address is not None:
            await state.wait_settled()
        try:
            yield
        finally:
            state.stop()

    app = ServiceApp(
        title="cmserve",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,
        # FastAPI's own OpenTelemetry instrumentation looks for a configured provider on every request
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = state
    app.state.api_keys = ApiKeys(settings.api_keys)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_key)
    app.state.generate = GenerateHandler(state, app.state.api_keys, app.state.rate_limiter)
    app.state.edit = GenerateHandler(state, app.state.api_keys, app.state.rate_limiter, EDIT)
    install_error_handlers(app)
    install_routes(app, guarded=bool(settings.api_keys) or settings.rate_limit_per_key > 0)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.wrap = RequestContext  # outermost: it sees every response
    return app


class ServiceApp(FastAPI):
    """FastAPI with cmserve's request context outside the whole stack Starlette and FastAPI build, so that it
    sees every response, the server-error handler's 500 included."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wrap: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.wrap is None else self.wrap(stack)
