"""Rate-limit slots for other software that calls the API with a fleet's key.

The key's limit holds for every caller, so a reconciliation job or a back office that uses the
same API key must take its slots from the same limiter as the fleet, or it will draw 429s that
pause the whole key. ``api_slot`` does that::

    import worker

    with worker.api_slot("acme") as slot:
        response = my_session.get(...)
        if response.status_code == 429:
            slot.rate_limited(response.headers.get("Retry-After"))

Each slot is booked from the fleet's limiter (one Redis call), waited for, honours every
penalty a 429 placed on the key, and is counted in Redis (``paypoll_shared_slots_total`` on
the fleet's /metrics). The poll planner sees that count and leaves those slots to you: polls
spend the key's share less what shared callers took.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from worker.connection import connect_redis, is_sentinel
from worker.errors import PaypollError, SlotTooFar
from worker.polling.store import PlanStore
from worker.ratelimit import RateLimiter
from worker.settings import Settings, load_settings

DEFAULT_TIMEOUT = 30.0  # seconds api_slot waits for a slot before giving up


class SlotTimeout(PaypollError):
    """No slot of the account's key could be had within the timeout."""


@dataclass
class SharedSlot:
    """A granted slot: send one request in it. ``waited``: seconds spent getting it."""

    account: str
    waited: float
    _limiter: RateLimiter

    def rate_limited(self, retry_after: float | str | None = None) -> float:
        """The API answered 429: pause the key for the whole fleet, honouring Retry-After
        (seconds or an HTTP date, as the header came); returns the pause applied."""
        return self._limiter.penalize(self.account, _retry_after_seconds(retry_after))


def _retry_after_seconds(value: float | str | None) -> float | None:
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class SharedLimiter:
    """The fleet's limiter, for callers outside the fleet (one per process is enough)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        client = connect_redis(settings.redis_url)
        keys = settings.keys()
        self.limiter = RateLimiter(
            redis=client,
            keys=keys,
            margin=settings.rate_margin,
            max_wait=settings.max_wait,
            max_ahead=settings.max_ahead,
            penalty_default=settings.penalty_default,
            watch_master=is_sentinel(settings.redis_url),
        )
        self.plans = PlanStore(redis=client, keys=keys)

    @contextmanager
    def slot(self, account: str, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[SharedSlot]:
        """Wait for a slot of ``account``'s key (at most ``timeout`` seconds, else SlotTimeout)
        and hold it for the body of the ``with``: send one request there."""
        rate = self.settings.account(account).rate
        started = time.monotonic()
        deadline = started + timeout
        hold: float | None = None
        while True:
            try:
                self.limiter.acquire(account, rate, hold=hold)
                break
            except SlotTooFar as exc:
                hold = exc.hold
                if time.monotonic() + exc.retry_in > deadline:
                    raise SlotTimeout(
                        f"account {account!r}: no rate-limit slot within {timeout:g} s"
                    ) from None
                time.sleep(exc.retry_in)
        self.plans.take_shared_slot(account)
        yield SharedSlot(account, time.monotonic() - started, self.limiter)


_shared: SharedLimiter | None = None
_shared_lock = threading.Lock()


@contextmanager
def api_slot(
    account: str, *, timeout: float = DEFAULT_TIMEOUT, settings: Settings | None = None
) -> Iterator[SharedSlot]:
    """A slot of ``account``'s key from the fleet's limiter (see the module's docstring).

    Settings come from ``PAYPOLL_*`` (read once per process) unless given; the account must be
    configured there (its rate is the key's). Raises UnknownAccount or SlotTimeout.
    """
    global _shared
    if settings is not None:
        shared = SharedLimiter(settings)
    else:
        with _shared_lock:
            if _shared is None:
                _shared = SharedLimiter(load_settings())
            shared = _shared
    with shared.slot(account, timeout=timeout) as slot:
        yield slot
