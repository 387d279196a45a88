"""Optional API keys (Authorization: Bearer) on the inference route, and a per-key rate limit."""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections.abc import Callable

from ..errors import RateLimited, Unauthorized

ANONYMOUS = ""  # the rate-limit bucket shared by all requests when no API keys are configured


class ApiKeys:
    """Checks `Authorization: Bearer KEY` against CM_API_KEYS in constant time; no keys = no check."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str:
        """The key the request used (ANONYMOUS when auth is off); Unauthorized when missing or wrong."""
        if not self._keys:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        matched = False
        for key in self._keys:  # compare with every key so timing does not reveal which one matched
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise Unauthorized("the API key is not valid")
        return given.decode()


class RateLimiter:
    """Token bucket per key: `rate` requests per second, bursts of max(1, rate); rate 0 = unlimited."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time)
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                wait = math.ceil((1 - tokens) / self.rate)
                raise RateLimited(f"more than {self.rate:g} requests/s for this API key (CM_RATE_LIMIT_PER_KEY)", wait)
            self._buckets[key] = (tokens - 1, now)
