"""The pure schedule functions, exactly, with a seeded random source."""

from __future__ import annotations

import random

from worker.schedule import MIN_POLL_DELAY, PollSchedule, retry_delay


def test_poll_delay_grows_with_full_jitter_under_a_cap() -> None:
    schedule = PollSchedule(first_delay=2, factor=2, max_delay=30, tracking_timeout=100)
    assert [schedule.ceiling(n) for n in range(6)] == [2, 4, 8, 16, 30, 30]
    rng = random.Random(1)
    for polls in range(20):
        for _ in range(50):
            delay = schedule.delay(polls, rng)
            assert MIN_POLL_DELAY <= delay <= schedule.ceiling(polls)
    assert schedule.ceiling(10_000) == 30  # no overflow


def test_next_poll_never_passes_the_deadline() -> None:
    schedule = PollSchedule(first_delay=50, factor=2, max_delay=60, tracking_timeout=100)
    rng = random.Random(3)
    assert schedule.next_poll_at(now=1090, polls=5, created_at=1000, rng=rng) <= 1100
    assert schedule.deadline(1000) == 1100


def test_retry_delay_backs_off_and_honours_retry_after() -> None:
    rng = random.Random(7)
    delays = [retry_delay(a, rng, base=1, cap=8) for a in range(1, 8)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(8, 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert retry_delay(1, rng, base=1, cap=8, retry_after=5) >= 5


def test_same_seed_same_schedule() -> None:
    schedule = PollSchedule()
    a = [schedule.delay(n, random.Random(42)) for n in range(10)]
    b = [schedule.delay(n, random.Random(42)) for n in range(10)]
    assert a == b


def test_jitter_share_bounds_the_delay() -> None:
    rng = random.Random(5)
    fixed = PollSchedule(first_delay=4, factor=1, max_delay=4, jitter=0.0)
    assert {fixed.delay(n, rng) for n in range(5)} == {4.0}
    half = PollSchedule(first_delay=4, factor=1, max_delay=4, jitter=0.5)
    delays = [half.delay(3, rng) for _ in range(200)]
    assert min(delays) >= 2.0
    assert max(delays) <= 4.0
