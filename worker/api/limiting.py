"""What the client needs from a rate limiter, and a limiter that never waits.

The real one is worker/ratelimit's ``RateLimiter``; the client only depends on this Protocol, so
the two packages do not import each other and tests or scripts can pass any object of this shape.
"""

from __future__ import annotations

from typing import Protocol


class GrantedSlot(Protocol):
    """A slot the caller has waited for: send now."""

    #: seconds from asking for the slot to being allowed to send
    waited: float

    def late(self) -> bool:
        """True when it is now too late to send in this slot (the caller did something slow
        since the wait ended): send nothing, and retry."""
        ...

    def wait_out(self) -> None:
        """Sleep until the slot itself, when the wait returned ``lead`` seconds before it."""
        ...

    def sent(self) -> None:
        """The call's first byte was just written: keep the key's next calls clear of it if
        that was too late for the slot (one limiter command then; none otherwise)."""
        ...


class WaitForSlot(Protocol):
    """Sleeps until a booked slot (``lead`` seconds before it, for a step that must come right
    before the send; the caller then sleeps the rest with ``wait_out``) and returns it."""

    def __call__(self, lead: float = 0.0) -> GrantedSlot: ...


class Limiter(Protocol):
    """A per-account limiter shared by the fleet (docs/architecture.md, "The limiter")."""

    def book(
        self,
        account: str,
        rate: float,
        *,
        max_wait: float | None = None,
        hold: float | None = None,
    ) -> WaitForSlot:
        """Book the account's next slot, or take up ``hold`` (a slot an earlier ``SlotTooFar``
        held for this caller); return a function that sleeps until it and returns the granted
        slot (the caller sends on return).

        Raises ``SlotTooFar`` when the slot is further than ``max_wait`` (its ``hold`` says
        whether a slot was held for the caller); the returned function may raise it too (a late
        caller's fresh slot was too far).
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
        self,
        account: str,
        rate: float,
        *,
        max_wait: float | None = None,
        hold: float | None = None,
    ) -> WaitForSlot:
        """Grant immediately: the wait returns at once, never late."""
        return _no_wait

    def penalize(self, account: str, retry_after: float | None) -> float:
        """Record nothing: 0.0 seconds of pause applied."""
        return 0.0


class _AnyTime:
    waited = 0.0

    def late(self) -> bool:
        return False

    def wait_out(self) -> None:
        return None

    def sent(self) -> None:
        return None


def _no_wait(lead: float = 0.0) -> GrantedSlot:
    return _AnyTime()
