"""When to poll next and when to retry: pure functions of attempts, clocks and a random source.

No I/O and no global randomness: the caller passes ``rng`` (a ``random.Random``), so tests are
exact. Models: dramatiq's ``compute_backoff`` and stripe-python's ``_should_retry``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from worker import defaults

MIN_POLL_DELAY = 0.5  # seconds; full jitter may draw ~0, and a poll that soon learns nothing new


@dataclass(frozen=True)
class PollSchedule:
    """Exponential backoff with jitter between polls, a cap, and an overall deadline.

    ``jitter`` is the share of each delay drawn at random: 1 is full jitter (a delay uniform in
    [0, ceiling]), 0 a fixed delay of ``ceiling``, 0.5 uniform in [ceiling/2, ceiling].
    """

    first_delay: float = defaults.POLL_FIRST_DELAY
    factor: float = defaults.POLL_FACTOR
    max_delay: float = defaults.POLL_MAX_DELAY
    tracking_timeout: float = defaults.TRACKING_TIMEOUT
    jitter: float = defaults.POLL_JITTER

    def ceiling(self, polls: int) -> float:
        """The largest delay after ``polls`` polls: ``first_delay * factor**polls``, capped."""
        # Exponent clamped so huge poll counts cannot overflow a float.
        return min(self.max_delay, self.first_delay * self.factor ** min(polls, 64))

    def delay(self, polls: int, rng: random.Random) -> float:
        """Seconds until the next poll after ``polls`` polls: uniform in
        [ceiling * (1 - jitter), ceiling], never under MIN_POLL_DELAY (or the ceiling)."""
        ceiling = self.ceiling(polls)
        return max(min(MIN_POLL_DELAY, ceiling), rng.uniform(ceiling * (1 - self.jitter), ceiling))

    def deadline(self, created_at: float) -> float:
        """When tracking of a payment created at ``created_at`` gives up."""
        return created_at + self.tracking_timeout

    def next_poll_at(self, now: float, polls: int, created_at: float, rng: random.Random) -> float:
        """When to poll next: after the jittered delay, but never after the deadline."""
        return min(now + self.delay(polls, rng), self.deadline(created_at))


def retry_delay(
    attempt: int,
    rng: random.Random,
    *,
    base: float = defaults.RETRY_BASE_DELAY,
    cap: float = defaults.RETRY_MAX_DELAY,
    retry_after: float | None = None,
) -> float:
    """Backoff before retry number ``attempt`` (1-based) after a safe-to-retry failure.

    Full jitter over ``base * 2**(attempt-1)``, capped; never sooner than a server's
    ``retry_after``.
    """
    ceiling = min(cap, base * 2 ** min(max(attempt - 1, 0), 32))
    delay = rng.uniform(ceiling / 2, ceiling)  # half jitter: a retry storm still spreads out
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
