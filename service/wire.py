"""The messages between front-end processes and the engine process (CM_FRONTENDS > 1), typed and msgpack-encoded.

msgspec encodes and decodes them against these types (no pickle, no format of our own). A front end sends
`Describe` once, then `Submit` and `Cancel`; the engine process answers `Description` (once its models are loaded)
and one `Result` per job. A finished job's pixels travel as one raw frame after the Result's (uint8, shape in the
Result): one copy into the socket, none through msgpack.
"""

from __future__ import annotations

import msgspec
import numpy as np

from .api.edit import Edit
from .errors import (
    Cancelled,
    DeadlineExceeded,
    Draining,
    EngineFailure,
    InvalidRequest,
    NotReady,
    OutOfMemory,
    QueueFull,
    RetryLater,
    ServiceError,
)
from .scheduler import Job

# The errors a job can end with, by name; one not listed crosses as EngineFailure with its message.
ERRORS: dict[str, type[ServiceError]] = {cls.__name__: cls for cls in (
    QueueFull, DeadlineExceeded, OutOfMemory, NotReady, Draining, EngineFailure, InvalidRequest, Cancelled)}


class Error(msgspec.Struct, frozen=True):
    kind: str  # a name of ERRORS
    message: str
    field: str | None = None
    retry_after_s: int | None = None  # RetryLater's


class Describe(msgspec.Struct, tag=True):
    """A front end asks for the served models (answered once they are loaded)."""


class ModelDescription(msgspec.Struct, frozen=True):
    name: str
    meta: str  # CheckpointMeta.to_json(): config, schedules, class names
    path: str
    sha256: str
    max_images_per_request: int


class Description(msgspec.Struct, tag=True):
    models: list[ModelDescription]
    default: str


class Submit(msgspec.Struct, tag=True):
    """A Job's fields; `deadline` is time.monotonic(), the same clock in every process of the machine."""

    id: int
    model: str
    sigmas: list[float]
    seed: int
    n: int
    class_label: int | None
    deadline: float
    task: str
    noised_start: bool = True
    edit: Edit | None = None
    interpolation: tuple[int, list[float]] | None = None


class Cancel(msgspec.Struct, tag=True):
    id: int
    error: Error


class Result(msgspec.Struct, tag=True):
    id: int
    error: Error | None
    labels: list[int] | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    shape: tuple[int, ...] | None = None  # the pixel frame's (n, H, W, C), when the job succeeded
    queue_depth: int = 0  # images waiting in the engine process as it sent this


ToEngine = Describe | Submit | Cancel
ToFrontend = Description | Result

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_to_frontend = msgspec.msgpack.Decoder(ToFrontend)


def encode(message: ToEngine | ToFrontend) -> bytes:
    return _encoder.encode(message)


def decode_to_engine(data: bytes) -> ToEngine:
    return _to_engine.decode(data)


def decode_to_frontend(data: bytes) -> ToFrontend:
    return _to_frontend.decode(data)


def error_message(error: ServiceError) -> Error:
    kind = type(error).__name__ if type(error).__name__ in ERRORS else "EngineFailure"
    retry = error.retry_after_s if isinstance(error, RetryLater) else None
    return Error(kind, error.message, error.field, retry)


def service_error(error: Error) -> ServiceError:
    """The ServiceError a message stands for: the same class, message, field (and Retry-After)."""
    cls = ERRORS.get(error.kind, EngineFailure)
    if issubclass(cls, RetryLater):
        return cls(error.message, error.retry_after_s or 1)
    made = cls(error.message)
    made.field = error.field
    return made


def submit_message(job_id: int, job: Job) -> Submit:
    return Submit(job_id, job.model, job.sigmas, job.seed, job.n, job.class_label, job.deadline, job.task,
                  job.noised_start, job.edit if isinstance(job.edit, Edit) else None, job.interpolation)


def job_of(message: Submit) -> Job:
    """A real Job for the engine's scheduler from a Submit."""
    return Job(model=message.model, sigmas=message.sigmas, seed=message.seed, n=message.n,
               class_label=message.class_label, deadline=message.deadline, task=message.task,
               noised_start=message.noised_start, edit=message.edit, interpolation=message.interpolation)


def result_frames(job_id: int, job: Job, queue_depth: int = 0) -> list[bytes | memoryview]:
    """A finished job's Result frame, and its pixels' frame when it succeeded."""
    ok = job.error is None
    result = Result(job_id, None if job.error is None else error_message(job.error), job.labels, job.submitted_at,
                    job.started_at, job.finished_at, tuple(job.images.shape) if ok else None, queue_depth)
    frames: list[bytes | memoryview] = [encode(result)]
    if ok:
        frames.append(memoryview(np.ascontiguousarray(job.images)).cast("B"))
    return frames


def complete(job: Job, result: Result, pixels: bytes | memoryview | None) -> None:
    """Set a front end's Job from the engine's Result (the handler then reads it as it would a local one)."""
    job.submitted_at, job.started_at, job.finished_at = result.submitted_at, result.started_at, result.finished_at
    job.labels = result.labels
    job.error = None if result.error is None else service_error(result.error)
    if result.shape is not None and pixels is not None:
        job.images = np.frombuffer(pixels, dtype=np.uint8).reshape(result.shape)
    job.remaining = 0 if job.error is None else job.remaining
    job.finished = True
