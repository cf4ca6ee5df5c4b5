"""The sandbox's rate-limit algorithms, one instance per API key (client_id).

Only ACCEPTED requests use up the allowance: a refused request (429) is not counted, so a
client that keeps knocking is not starved forever. (The real API documents nothing here;
api-contract.md asks for the strictest reading of the limit itself, not of retries.)

Every method takes ``now`` (``time.time()``, read by the caller under the state lock) so the
decisions and the recorded timestamps use the same clock readings.
"""

from __future__ import annotations

import collections
import math
from typing import Protocol


class Limiter(Protocol):
    """One API key's allowance."""

    def try_acquire(self, now: float) -> float | None:
        """Accept (count) a request at ``now`` and return None, or return the seconds until
        a request would be accepted (> 0) without counting anything."""


class SlidingWindow:
    """At most ``capacity`` accepted requests in any window (t - 1 s, t]."""

    def __init__(self, rate: float) -> None:
        self.capacity = max(1, math.floor(rate))
        self._accepted: collections.deque[float] = collections.deque()

    def try_acquire(self, now: float) -> float | None:
        accepted = self._accepted
        while accepted and accepted[0] <= now - 1.0:
            accepted.popleft()
        if len(accepted) >= self.capacity:
            # The oldest accepted request leaves the window 1 s after it came in.
            return max(accepted[0] + 1.0 - now, 1e-6)
        accepted.append(now)
        return None


class FixedWindow:
    """At most ``capacity`` accepted requests per calendar second (int(now))."""

    def __init__(self, rate: float) -> None:
        self.capacity = max(1, math.floor(rate))
        self._second = -1
        self._count = 0

    def try_acquire(self, now: float) -> float | None:
        second = math.floor(now)
        if second != self._second:
            self._second, self._count = second, 0
        if self._count >= self.capacity:
            return max(second + 1.0 - now, 1e-6)
        self._count += 1
        return None


class TokenBucket:
    """A bucket of ``rate`` tokens (at least 1), refilled at ``rate`` per second, full at start."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._tokens = self.capacity
        self._last: float | None = None

    def try_acquire(self, now: float) -> float | None:
        if self._last is not None and now > self._last:
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now if self._last is None else max(self._last, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / self.rate


def make_limiter(mode: str, rate: float) -> Limiter:
    """A fresh limiter for one key: ``sliding``, ``fixed`` or ``bucket``."""
    if mode == "sliding":
        return SlidingWindow(rate)
    if mode == "fixed":
        return FixedWindow(rate)
    if mode == "bucket":
        return TokenBucket(rate)
    raise ValueError(f"unknown limit mode {mode!r}")


def retry_after_seconds(wait: float) -> int:
    """The Retry-After value in whole seconds: the ceiling of ``wait``, at least 1."""
    return max(1, math.ceil(wait))
