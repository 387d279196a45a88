"""Reliability 6: schemathesis over the OpenAPI document → zero 5xx, every response matches the schema.

schemathesis reads the app's own OpenAPI document and generates requests for every operation (valid
ones, and invalid ones for the validation paths); each response must not be a server error, must carry
a documented status code and content type, and its body must match the schema documented for that code.
The app runs in-process (ASGI) with a tiny checkpoint, one fresh app per operation (schemathesis ends
the app's lifespan after each test).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from service.app import create_app
from service.schemas import ErrorResponse
from service.settings import Settings
from tests.integration.conftest import app_settings, running_app

# Examples per operation and generation phase: 30 runs the file in well under a minute on 2 cores; raise it
# (CM_FUZZ_EXAMPLES=1000, CM_FUZZ_RANDOM=1 for fresh random inputs each run) to search harder.
MAX_EXAMPLES = int(os.environ.get("CM_FUZZ_EXAMPLES", "30"))
DERANDOMIZE = os.environ.get("CM_FUZZ_RANDOM", "") not in ("1", "true", "yes")  # the same inputs every run by default
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


def served_settings(checkpoint: Path) -> Settings:
    return app_settings({"tiny": checkpoint}, max_queue=1024, request_timeout_s=120)


# The OpenAPI document does not depend on the model file, so it can be read at import time without one.
schema = schemathesis.openapi.from_dict(create_app(served_settings(Path("unused.safetensors"))).openapi())


class FreshAppPerLifespan:
    """An ASGI app that builds a new service app at each lifespan start and reports it started once the
    models are loaded and warmed up (the service loads in the background so /healthz answers at once; a
    request that came before warm-up would rightly get 503, which is not what this test is about)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            assert self.app is not None, "a request came before the lifespan started"
            await self.app(scope, receive, send)
            return
        app = self.app = create_app(self.settings)

        async def send_when_ready(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                service = app.state.service
                await service.wait_settled()
                if not service.ready:
                    message = {"type": "lifespan.startup.failed", "message": f"not ready: {service.failure}"}
            await send(message)

        await app(scope, receive, send_when_ready)


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path) -> FreshAppPerLifespan:
    return FreshAppPerLifespan(served_settings(tiny_checkpoint))


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_response_is_documented_and_never_a_server_error(case: Any, served: FreshAppPerLifespan) -> None:
    case.call_and_validate(app=served, checks=CHECKS)


@pytest.mark.anyio
@pytest.mark.parametrize("body", [b"-\xff", b"[" * 50_000], ids=["not-utf8", "nested-too-deep"])
async def test_bodies_that_do_not_parse_are_422_not_an_undocumented_400(tiny_checkpoint: Path, body: bytes) -> None:
    """Found by schemathesis: FastAPI answered these with 400 "There was an error parsing the body"."""
    async with running_app(served_settings(tiny_checkpoint)) as (_, client):
        response = await client.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = ErrorResponse.model_validate(response.json()).error
    assert error.type == "invalid_request" and error.message.startswith("request body is not valid JSON")
