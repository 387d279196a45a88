"""Domain errors of the service. They know nothing of HTTP: service/api/errors.py maps them to status codes."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a request can end with; `reason` is the failure-metric label."""

    reason = "error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(ServiceError):
    """A request that is well-formed JSON but asks for something this server cannot do; names the field."""

    reason = "invalid"


class BodyTooLarge(InvalidRequest):
    """The body is longer than CM_MAX_BODY_BYTES (by its Content-Length, or counted as it arrives)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes (CM_MAX_BODY_BYTES)")


class UnsupportedMediaType(InvalidRequest):
    """The body is not sent as JSON."""


class UnknownModel(InvalidRequest):
    """The request names a model that is not served."""


class RetryLater(ServiceError):
    """A refusal that says when to try again (the Retry-After header)."""

    reason = "rejected"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(RetryLater):
    """Admitting the request would put more than CM_MAX_QUEUE images in the queue."""


class RateLimited(RetryLater):
    """This API key sent more than CM_RATE_LIMIT_PER_KEY requests per second."""


class NotReady(ServiceError):
    """Models are still loading and warming up."""

    reason = "rejected"


class Draining(NotReady):
    """The server received SIGTERM: it finishes what it holds and accepts nothing new."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its images were done; its remaining images never ran."""

    reason = "timeout"


class RequestTimeout(ServiceError):
    """The request's headers or body did not arrive within CM_READ_TIMEOUT_S."""

    reason = "timeout"


class Cancelled(ServiceError):
    """The client went away; its remaining images left the queue."""

    reason = "cancelled"


class OutOfMemory(ServiceError):
    """The device ran out of memory even for a batch of one image."""

    reason = "oom"


class EngineFailure(ServiceError):
    """The network evaluation failed for a reason that is not the request's fault."""

    reason = "error"


class Unauthorized(ServiceError):
    """CM_API_KEYS is set and the request carries no valid `Authorization: Bearer` key."""

    reason = "invalid"


class NotAcceptable(InvalidRequest):
    """The Accept header names no representation this request can have."""
