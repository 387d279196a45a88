"""POST /v1/generate (and /v1/edit): every duty of a sampling request, defined once.

A handler serves one `Endpoint`: its path, its request schema and how a valid request becomes a Job (a `Plan`);
GENERATE is here, EDIT in edit.py. Two entry points call `GenerateHandler`, in the same order: `begin` (request
id, arrival time, in-flight count), `answer` (everything below; it never raises) and `end` (metrics, the
access-log line). The FastAPI routes (routes.py) are one; the other is the HTTP protocol (protocol.py), which
answers the generate requests it may take below ASGI, without uvicorn's request cycle. Each hands over how it
reads the body and how it learns that the client left; everything else is here:

  1. API key and per-key rate limit (401, 429)
  2. the body: its declared length against CM_MAX_BODY_BYTES (413), then read (counted against the cap,
     a client that leaves → 499) before the request's deadline (504)
  3. content type (415) and validation in one pass (422 naming the field)
  4. readiness (503), the model, the endpoint's plan (edit: the image and task fields), n, the schedule and the
     class label (404, 422)
  5. the job: queued, waited for, raced against the client's disconnect and the deadline (counted from arrival)
  6. encoding and the response: JSON with base64 images, or the raw image for `Accept: image/*` and n = 1
Every failure is a `ServiceError` whose class gives the status (api/errors.py) and whose `reason` is the
failure label of the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from ..encode import MIME
from ..errors import (
    BodyTooLarge,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    ServiceError,
    UnsupportedMediaType,
)
from ..metrics import UNKNOWN_MODEL
from ..registry import ServedModel
from ..scheduler import Job
from ..schemas import MAX_SEED, GenerateRequest, SamplingRequest
from ..state import ServiceState
from .errors import describe_validation_error, service_error_reply, unexpected_error_reply
from .negotiate import choose_representation
from .requests import Headers, Reply, RequestLog, log_request, new_request_log
from .security import ApiKeys, RateLimiter

logger = logging.getLogger("cmserve.api")

PATH = "/v1/generate"
UTF8_BOM = b"\xef\xbb\xbf"
_seeds = random.Random()  # seeds need not be secret: this is fast, and seeded from os.urandom

# The whole body; raises Cancelled when the client leaves first and BodyTooLarge past `limit` bytes.
ReadBody = Callable[[int], Awaitable[bytes]]
# watch(on_disconnect) arranges for on_disconnect() to be called if the client goes away; it returns `unwatch`.
DisconnectWatch = Callable[[Callable[[], None]], Callable[[], None]]


@dataclass
class Plan:
    """What a valid request asks of the sampler beyond the common fields (an endpoint's `plan` makes it)."""

    task: str  # scheduler.TASKS
    n: int
    seed: int | None  # None: random
    sigmas: list[float] | None = None  # a schedule the task fixes (denoise: [σ]); None: steps or sigmas
    how: dict[str, Any] = field(default_factory=dict)  # further Job fields (edit, noised_start, interpolation)
    alphas: list[float] | None = None  # interpolate: every image has seed a and its own α


@dataclass(frozen=True)
class Endpoint:
    """A sampling endpoint: its path, its request schema, how a valid request becomes a Plan (raising
    InvalidRequest naming the field), and the task label of requests whose body never said."""

    path: str
    schema: type[SamplingRequest]
    plan: Callable[[Any, ServedModel], Plan]
    task: str


def plan_generate(body: GenerateRequest, served: ServedModel) -> Plan:
    """n images from seed + i, or, with `interpolate`, one image per α from seeds a and b."""
    spec = body.interpolate
    if spec is None:
        return Plan("generate", body.n, body.seed)
    if body.seed is not None:
        raise InvalidRequest("give the seeds in interpolate.seeds, not seed", field="seed")
    alphas = spec.alpha_values()
    if "n" in body.model_fields_set and body.n != len(alphas):
        raise InvalidRequest(f"n is the number of interpolation points ({len(alphas)}) here; got {body.n}", field="n")
    return Plan("interpolate", len(alphas), spec.seeds[0], how={"interpolation": (spec.seeds[1], alphas)},
                alphas=alphas)


GENERATE = Endpoint(PATH, GenerateRequest, plan_generate, "generate")


class GenerateHandler:
    """A sampling request's duties (module docstring), with the server's state and checks (one per endpoint)."""

    def __init__(self, state: ServiceState, api_keys: ApiKeys, rate_limiter: RateLimiter,
                 endpoint: Endpoint = GENERATE) -> None:
        self.state = state
        self.api_keys = api_keys
        self.rate_limiter = rate_limiter
        self.endpoint = endpoint

    def begin(self, headers: Headers, arrived: float) -> RequestLog:
        """A request's headers arrived (monotonic time `arrived`): its log record, and it counts as in flight."""
        self.state.request_started()
        return new_request_log(headers, arrived)

    def end(self, log: RequestLog, status: int) -> None:
        """The request was answered with `status` (or its client left): metrics and the access-log line."""
        self.state.request_ended()
        if log.admitted:
            self.state.release()
        seconds = time.monotonic() - log.started
        task = log.fields.get("task", self.endpoint.task)
        self.state.metrics.observe_request(log.model or UNKNOWN_MODEL, status, seconds, log.reason, task)
        log_request("POST", self.endpoint.path, log, status, seconds)

    async def answer(self, log: RequestLog, headers: Headers, read_body: ReadBody, watch: DisconnectWatch) -> Reply:
        """The reply to a request; errors become their HTTP reply here (and the failure reason is noted)."""
        try:
            return await self._answer(log, headers, read_body, watch)
        except ServiceError as e:
            log.reason = e.reason
            if isinstance(e, Cancelled):
                log.fields["status_note"] = "client disconnected"
            return service_error_reply(e)
        except Exception:  # a bug
            log.reason = "error"
            return unexpected_error_reply("POST", self.endpoint.path)

    async def _answer(self, log: RequestLog, headers: Headers, read_body: ReadBody, watch: DisconnectWatch) -> Reply:
        key = self.api_keys.check(_header(headers, b"authorization"))
        self.rate_limiter.check(key)
        body = await self._read(log, headers, read_body)
        request = parse_request(body, _header(headers, b"content-type"), self.endpoint.schema)
        return await self._generate(request, _header(headers, b"accept"), log, watch)

    async def _read(self, log: RequestLog, headers: Headers, read_body: ReadBody) -> bytes:
        limit = self.state.settings.max_body_bytes
        declared = _header(headers, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit)  # without reading a byte of it
        left = log.started + self.state.settings.request_timeout_s - time.monotonic()
        try:
            async with asyncio.timeout(left):
                return await read_body(limit)
        except TimeoutError:
            raise self._deadline_error() from None

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request took longer than {self.state.settings.request_timeout_s:g} s "
                                "(CM_REQUEST_TIMEOUT_S); its remaining images were dropped")

    async def _generate(self, body: Any, accept: str | None, log: RequestLog, watch: DisconnectWatch) -> Reply:
        state, settings = self.state, self.state.settings
        state.admit()
        log.admitted = True
        served = state.registry.get(body.model)
        log.model = served.name
        log.fields["task"] = getattr(body, "task", self.endpoint.task)  # an edit's, even when its fields fail
        plan = self.endpoint.plan(body, served)
        served.check_images(plan.n)
        log.fields["task"] = plan.task
        raw_format = choose_representation(accept, body.format, "format" in body.model_fields_set, plan.n)
        sigmas = plan.sigmas or served.resolve_sigmas(body.steps, body.sigmas)
        label = served.resolve_class_label(body.class_label)
        seed = random_seed(plan.n) if plan.seed is None else plan.seed
        log.fields.update(n=plan.n, steps=len(sigmas), seed=seed)

        job = served.make_job(seed=seed, n=plan.n, sigmas=sigmas, class_label=label,
                              deadline=log.started + settings.request_timeout_s, task=plan.task, **plan.how)
        await self._run_job(job, watch)
        fmt = raw_format or body.format
        encoded, encode_s = await state.encoder.encode(job.images, fmt)  # type: ignore[union-attr]
        state.metrics.observe_encode(fmt, encode_s)
        timings = _timings_ms(job, encode_s, log.started)
        log.fields["timings_ms"] = timings
        labels = job.class_labels
        if raw_format is not None:
            return _raw_image(encoded[0], raw_format, served.name, seed, sigmas, labels[0])
        return _json_images(encoded, fmt, served.name, seed, sigmas, labels, timings, plan.alphas)

    async def _run_job(self, job: Job, watch: DisconnectWatch) -> None:
        """Queue the job and wait for it, racing the client's disconnect and the deadline."""
        scheduler = self.state.scheduler
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[str | None] = loop.create_future()  # None: the job ended; else why we stopped waiting
        job.on_done = lambda _: loop.call_soon_threadsafe(_resolve, ended, None)
        scheduler.submit(job)
        unwatch = watch(lambda: _resolve(ended, "disconnect"))
        timer = loop.call_later(job.deadline - time.monotonic(), _resolve, ended, "deadline")
        try:
            why = await ended
        finally:
            timer.cancel()
            unwatch()
        if why is not None:
            error = Cancelled("the client disconnected") if why == "disconnect" else self._deadline_error()
            scheduler.cancel(job, error)  # False if it finished meanwhile: then its result stands
        if job.error is not None:
            raise job.error


def random_seed(n: int) -> int:
    """A random seed whose n images' seeds (seed … seed + n − 1) are all at most MAX_SEED."""
    return min(_seeds.getrandbits(63), MAX_SEED - n + 1)


def parse_request(body: bytes, content_type: str | None, schema: type[SamplingRequest] = GenerateRequest) -> Any:
    """The validated request: JSON parsed and validated in one pass; errors name the field."""
    if body and not is_json(content_type):
        shown = f", not {content_type}" if content_type else " (the request had no Content-Type)"
        raise UnsupportedMediaType(f"send the body as JSON with Content-Type: application/json{shown}")
    try:
        return schema.model_validate_json(body.removeprefix(UTF8_BOM))
    except ValidationError as e:
        message, field = describe_validation_error(e.errors(include_url=False), schema)
        raise InvalidRequest(message, field=field) from None


def is_json(content_type: str | None) -> bool:
    """application/json (any parameters) or application/*+json."""
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _header(headers: Headers, name: bytes) -> str | None:
    """The first value of a header (`name` in lower case)."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _resolve(future: asyncio.Future[str | None], why: str | None) -> None:
    if not future.done():
        future.set_result(why)


def _timings_ms(job: Job, encode_s: float, arrived: float) -> dict[str, float]:
    started = job.started_at or job.submitted_at
    finished = job.finished_at or started
    return {
        "queue": round((started - job.submitted_at) * 1000, 3),
        "compute": round((finished - started) * 1000, 3),
        "encode": round(encode_s * 1000, 3),
        "total": round((time.monotonic() - arrived) * 1000, 3),
    }


JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


def _json_images(encoded: list[bytes], fmt: str, model: str, seed: int, sigmas: list[float],
                 labels: list[int | None], timings: dict[str, float], alphas: list[float] | None = None) -> Reply:
    """The GenerateResponse document (schemas.py), compact; interpolated images have seed a and their α."""
    mime = MIME[fmt]
    images = [{"index": i, "seed": seed + i, "class_label": None if labels[i] is None else int(labels[i]), "mime": mime,
               "b64": base64.b64encode(data).decode()} for i, data in enumerate(encoded)]
    if alphas is not None:
        for image, alpha in zip(images, alphas, strict=True):
            image.update(seed=seed, alpha=alpha)
    document = {"model": model, "created": int(time.time()), "seed": seed, "sigmas": [float(s) for s in sigmas],
                "images": images,
                "timings_ms": timings}
    return Reply(200, list(JSON_HEADERS), orjson.dumps(document))


def _raw_image(data: bytes, fmt: str, model: str, seed: int, sigmas: list[float], label: int | None) -> Reply:
    headers = [(b"content-type", MIME[fmt].encode()), (b"x-model", model.encode()), (b"x-seed", str(seed).encode()),
               (b"x-sigmas", ",".join(repr(s) for s in sigmas).encode())]
    if label is not None:
        headers.append((b"x-class-label", str(label).encode()))
    return Reply(200, headers, data)
