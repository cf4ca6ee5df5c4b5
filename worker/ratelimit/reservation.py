"""A reservation: what one call of the limiter's reserve script answered, on both clocks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer of one ``reserve`` call.

    ``slot`` and ``now`` are seconds on the Redis clock (``TIME``); ``wait = slot - now``.
    ``granted`` says whether the slot was booked for the caller, and ``held`` whether it was
    booked ahead (further than ``max_wait``): the caller should come back ``retry_in`` seconds
    from now, ``limiter.HOLD_LEAD`` x ``max_wait`` before the slot, and use it then. When
    ``granted`` is False no capacity was taken and ``retry_in`` says when to ask again: when
    the slot is half of ``max_ahead`` away (others may have booked it by then: a hint, not a
    promise).

    ``asked_at`` and ``answered_at`` are the caller's clock (``time.monotonic()``) just before
    the call was sent and just after its answer was read: Redis read ``now`` in between. The
    limiter's ``RedisClock`` learns from these round trips where Redis times fall on the
    caller's clock, which ``sleep_until`` and ``lateness`` use.
    """

    account: str
    slot: float
    now: float
    wait: float
    granted: bool
    retry_in: float
    asked_at: float
    answered_at: float
    held: bool = False
