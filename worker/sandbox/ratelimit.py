"""The sandbox's rate-limit algorithms, one instance per API key (client_id).

Only ACCEPTED requests use up the allowance: a refused request (429) is not counted, so a
client that keeps knocking is not starved forever. (The real API documents nothing here;
api-contract.md asks for the strictest reading of the limit itself, not of retries.)

Every method takes ``now``: the request's arrival (the kernel's receive timestamp, or the wall
clock when the request line was read). Handler threads judge requests in whatever order they
get the state lock, so arrivals can come out of order; the window limiters judge each one at
its own arrival, exactly, rather than moving it later (which would invent 429s).
"""

from __future__ import annotations

import bisect
import math
from typing import Protocol


class Limiter(Protocol):
    """One API key's allowance."""

    def try_acquire(self, now: float) -> float | None:
        """Accept (count) a request at ``now`` and return None, or return the seconds until
        a request would be accepted (> 0) without counting anything."""


class SlidingWindow:
    """At most ``capacity`` accepted requests in any window (t - 1 s, t], arrivals in any order.

    A request at ``now`` is accepted iff every window containing it still has room, that is iff
    no ``capacity + 1`` consecutive accepted arrivals including ``now`` lie within less than
    1 s of each other (two arrivals share some window (t - 1, t] iff they are < 1 s apart).
    """

    def __init__(self, rate: float) -> None:
        self.capacity = max(1, math.floor(rate))
        self._accepted: list[float] = []  # sorted; only the last 2 s are kept
        self._latest = -math.inf

    def try_acquire(self, now: float) -> float | None:
        accepted = self._accepted
        self._latest = max(self._latest, now)
        # Arrivals more than 2 s before the latest one can share no window with a request
        # still to come (threads judge requests at most a fraction of a second late).
        stale = bisect.bisect_right(accepted, self._latest - 2.0)
        if stale:
            del accepted[:stale]
        at = bisect.bisect_right(accepted, now)
        cap = self.capacity
        # Only arrivals less than 1 s away can share a window with this one.
        low = bisect.bisect_right(accepted, now - 1.0)
        high = bisect.bisect_left(accepted, now + 1.0)
        if high - low < cap:
            accepted.insert(at, now)
            return None
        merged = [*accepted[low:at], now, *accepted[at:high]]
        here = at - low
        wait = 0.0
        for first in range(max(0, here - cap), here + 1):
            last = first + cap
            if last < len(merged) and merged[last] - merged[first] < 1.0:
                # Room comes back when the group's first arrival leaves the window; a request
                # that is the first of a full group (later arrivals already judged) waits 1 s.
                wait = max(wait, merged[first] + 1.0 - now)
        if wait > 0.0:
            return max(wait, 1e-6)
        accepted.insert(at, now)
        return None


class FixedWindow:
    """At most ``capacity`` accepted requests per calendar second (int(now)), in any order."""

    def __init__(self, rate: float) -> None:
        self.capacity = max(1, math.floor(rate))
        self._counts: dict[int, int] = {}

    def try_acquire(self, now: float) -> float | None:
        second = math.floor(now)
        counts = self._counts
        if len(counts) > 4:
            for old in [s for s in counts if s < second - 2]:
                del counts[old]
        if counts.get(second, 0) >= self.capacity:
            return max(second + 1.0 - now, 1e-6)
        counts[second] = counts.get(second, 0) + 1
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
