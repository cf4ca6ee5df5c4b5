"""Counting a real limiter's reservations in tests (the script still runs against Redis)."""

from __future__ import annotations

from worker.ratelimit import RateLimiter


class CountingReserve:
    """Counts ``limiter``'s reservations (EVALSHAs of reserve.lua) and passes them on."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.calls = 0
        self._script = limiter._reserve
        limiter._reserve = self  # type: ignore[assignment]

    def __call__(self, **kwargs: object) -> object:
        self.calls += 1
        return self._script(**kwargs)
