"""What the client needs from a rate limiter, and a limiter that never waits.

The real one is worker/ratelimit's ``RateLimiter``; the client only depends on this Protocol, so
the two packages do not import each other and tests or scripts can pass any object of this shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Limiter(Protocol):
    """A per-account limiter shared by the fleet (docs/architecture.md, "The limiter")."""

    def book(
        self, account: str, rate: float, *, max_wait: float | None = None
    ) -> Callable[[], float]:
        """Book the account's next slot; return a function that sleeps until it and returns
        the seconds waited (the caller sends on return).

        Raises ``SlotTooFar`` (nothing booked) when the slot is further than ``max_wait``; the
        returned function may raise it too (a late caller's fresh slot was too far).
        """
        ...

    def penalize(self, account: str, retry_after: float | None) -> float:
        """Pause the account for every process after a 429; return the pause applied."""
        ...


class UnlimitedLimiter:
    """A Limiter that grants every call at once: for callers that have no Redis limiter.

    Using it against the real API breaks design.md's invariant 1; it exists for tools and tests
    that talk to a sandbox without a rate limit.
    """

    def book(
        self, account: str, rate: float, *, max_wait: float | None = None
    ) -> Callable[[], float]:
        """Grant immediately: the wait returns 0.0 seconds at once."""
        return _no_wait

    def penalize(self, account: str, retry_after: float | None) -> float:
        """Record nothing: 0.0 seconds of pause applied."""
        return 0.0


def _no_wait() -> float:
    return 0.0
