"""The rate limiter against a real Redis: spacing, far answers, penalties, cap, script reloads."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import redis

from tests.counting import CountingReserve
from tests.redis_server import running_redis
from tests.waiting import wait_until
from worker import metrics
from worker.errors import SlotTooFar
from worker.keys import Keys
from worker.ratelimit import RateLimiter, Reservation
from worker.ratelimit.limiter import Granted

RATE = 5.0
MARGIN = 0.005
INTERVAL = 1 / RATE + MARGIN  # 0.205 s


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The largest number of ``times`` in any half-open interval [t, t + window)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.fixture
def limiter(redis_client: redis.Redis, keys: Keys) -> RateLimiter:
    return RateLimiter(redis=redis_client, keys=keys, margin=MARGIN, max_wait=1.0)


def stored_slot(client: redis.Redis, keys: Keys, account: str) -> bytes | None:
    """The key's next free slot as stored (the only field that holds capacity)."""
    value: bytes | None = client.get(keys.limiter(account))
    return value


def test_slots_are_evenly_spaced_on_the_redis_clock(limiter: RateLimiter) -> None:
    bookings = [limiter.reserve("acme", RATE, max_wait=100.0) for _ in range(12)]
    assert all(b.granted for b in bookings)
    assert bookings[0].wait == 0.0  # an idle key is free now
    gaps = [b.slot - a.slot for a, b in itertools.pairwise(bookings)]
    assert gaps == pytest.approx([INTERVAL] * 11, abs=2e-6)
    # Each answer's wait is its slot measured on the same (Redis) clock.
    for b in bookings:
        assert b.wait == pytest.approx(b.slot - b.now, abs=1e-6)
    assert max_in_window([b.slot for b in bookings]) == RATE


def test_fractional_rate_is_rounded_down_to_whole_calls(limiter: RateLimiter) -> None:
    assert limiter.interval(7.5) == pytest.approx(1 / 7 + MARGIN)
    assert limiter.interval(0.5) == pytest.approx(2 + MARGIN)
    slots = [limiter.reserve("frac", 7.5, max_wait=100.0).slot for _ in range(30)]
    assert max_in_window(slots) == 7
    with pytest.raises(ValueError, match="rate"):
        limiter.interval(0)


def test_a_far_answer_books_nothing(
    limiter: RateLimiter, redis_client: redis.Redis, keys: Keys
) -> None:
    # Beyond max_ahead (here equal to max_wait, so nothing is held either).
    granted = [limiter.reserve("acme", RATE, max_wait=0.9, max_ahead=0.9) for _ in range(5)]
    assert all(b.granted for b in granted)  # slots at 0, .205, .41, .615, .82
    before = stored_slot(redis_client, keys, "acme")
    far = [limiter.reserve("acme", RATE, max_wait=0.9, max_ahead=0.9) for _ in range(20)]
    assert not any(b.granted or b.held for b in far)
    assert stored_slot(redis_client, keys, "acme") == before
    # Every far answer named the same slot, the one still free.
    assert len({b.slot for b in far}) == 1
    assert far[0].slot - granted[-1].slot == pytest.approx(INTERVAL, abs=2e-6)
    # ... and told each to come back when it is half of max_ahead away.
    for b in far:
        assert b.retry_in == pytest.approx(b.wait - 0.45, abs=1e-6)
    after = limiter.reserve("acme", RATE, max_wait=10.0)
    assert after.granted
    assert after.slot == far[0].slot


def test_acquire_holds_a_far_slot_and_says_when_to_come_back(
    limiter: RateLimiter, redis_client: redis.Redis, keys: Keys
) -> None:
    first = [limiter.reserve("acme", RATE, max_wait=1.0) for _ in range(5)]
    started = time.monotonic()
    with pytest.raises(SlotTooFar) as info:
        limiter.acquire("acme", RATE, max_wait=0.5)
    assert time.monotonic() - started < 0.1  # told at once, did not sleep
    assert info.value.account == "acme"
    # The free slot, at 5 * 0.205 s, is booked and held for the caller (within max_ahead)...
    assert info.value.hold == pytest.approx(first[0].slot + 5 * INTERVAL, abs=1e-5)
    held_until = int(stored_slot(redis_client, keys, "acme") or 0) / 1e6
    assert held_until == pytest.approx(info.value.hold + INTERVAL, abs=2e-6)
    # ... and it should come back when the slot is 0.45 s (0.9 x max_wait) away.
    assert info.value.retry_in == pytest.approx(5 * INTERVAL - 0.45, abs=0.05)


def test_acquire_sleeps_until_the_slot(limiter: RateLimiter) -> None:
    started = time.monotonic()
    waits = [limiter.acquire("acme", RATE) for _ in range(4)]
    elapsed = time.monotonic() - started
    # Never early; late only by the host's scheduling (generous bound: shared, loaded CI).
    assert 3 * INTERVAL - 0.002 <= elapsed <= 3 * INTERVAL + 0.25
    assert sum(waits) == pytest.approx(elapsed, abs=0.01)


def test_acquire_uses_the_injected_sleep(redis_client: redis.Redis, keys: Keys) -> None:
    slept: list[float] = []
    lim = RateLimiter(redis=redis_client, keys=keys, margin=MARGIN, sleep=slept.append)
    lim.acquire("acme", RATE)
    lim.acquire("acme", RATE)
    assert len(slept) == 1  # the first call was free now: no sleep at all
    assert INTERVAL - 0.1 <= slept[0] <= INTERVAL  # less what passed between the two calls


def test_booking_ahead_is_capped_by_max_ahead(
    limiter: RateLimiter, redis_client: redis.Redis, keys: Keys
) -> None:
    results = [limiter.reserve("acme", RATE, max_wait=0.9, max_ahead=2.0) for _ in range(50)]
    # Slots 0 .. 0.82 s are within max_wait (sleep for them), 1.025 .. 1.845 s within max_ahead
    # (held); 2.05 s is not: fifty callers could not book more.
    assert [(b.granted, b.held) for b in results[:10]] == [(True, False)] * 5 + [(True, True)] * 5
    assert not any(b.granted or b.held for b in results[10:])
    booked_until = int(stored_slot(redis_client, keys, "acme") or 0) / 1e6
    assert booked_until - results[0].now == pytest.approx(10 * INTERVAL, abs=0.01)
    # The state expires once its slot is past: a dead caller's bookings leave nothing behind.
    ttl_ms = redis_client.pttl(keys.limiter("acme"))
    assert 0 < ttl_ms <= 10 * INTERVAL * 1000 + 2


def test_a_held_slot_is_used_without_a_second_reservation(limiter: RateLimiter) -> None:
    for _ in range(3):
        limiter.reserve("acme", RATE, max_wait=1.0)
    reserves = CountingReserve(limiter)
    with pytest.raises(SlotTooFar) as info:
        limiter.book("acme", RATE, max_wait=0.3)
    assert reserves.calls == 1 and info.value.hold is not None
    # Back after retry_in, as a rescheduled job would be: the held slot, no reservation.
    time.sleep(info.value.retry_in)
    granted = limiter.book("acme", RATE, max_wait=0.3, hold=info.value.hold)()
    assert reserves.calls == 1
    assert granted.booking.slot == info.value.hold
    # It waited until the held slot (Redis clock), not less.
    seconds, micros = limiter.redis.time()
    assert seconds + micros / 1e6 >= info.value.hold
    # The next caller gets the slot after it: the hold was a booking like any other.
    assert limiter.reserve("acme", RATE, max_wait=1.0).slot == pytest.approx(
        info.value.hold + INTERVAL, abs=2e-6
    )


def test_a_hold_back_too_early_is_handed_back_without_a_reservation(
    limiter: RateLimiter,
) -> None:
    hold = limiter.reserve("acme", RATE, max_wait=0.0).now + 3.0
    reserves = CountingReserve(limiter)
    with pytest.raises(SlotTooFar) as info:
        limiter.book("acme", RATE, max_wait=1.0, hold=hold)
    assert reserves.calls == 0
    assert info.value.hold == hold
    assert info.value.retry_in == pytest.approx(3.0 - 0.9, abs=0.05)


def test_a_stale_hold_is_counted_late_and_a_fresh_slot_booked(limiter: RateLimiter) -> None:
    now = limiter.reserve("acme", RATE, max_wait=0.0).now
    reserves = CountingReserve(limiter)
    late_before = late_slots("acme")
    granted = limiter.book("acme", RATE, hold=now - 30.0)()  # a job back 30 s late
    assert reserves.calls == 1
    assert late_slots("acme") == late_before + 1  # the held slot went unused: counted
    assert granted.booking.slot == pytest.approx(now + INTERVAL, abs=0.05)
    assert not granted.booking.held


def test_a_hold_in_a_process_without_a_clock_model_costs_one_time_probe(
    redis_client: redis.Redis, keys: Keys
) -> None:
    booker = RateLimiter(redis=redis_client, keys=keys, margin=MARGIN, max_wait=0.0)
    booker.book("acme", RATE)  # free now
    with pytest.raises(SlotTooFar) as info:
        booker.book("acme", RATE)  # 0.205 s away, more than max_wait 0: held
    assert info.value.hold is not None
    fresh = RateLimiter(redis=redis_client, keys=keys, margin=MARGIN, max_wait=1.0)
    reserves = CountingReserve(fresh)
    granted = fresh.book("acme", RATE, hold=info.value.hold)()
    assert (reserves.calls, fresh.clock_probes) == (0, 1)
    assert granted.booking.slot == info.value.hold


def test_penalty_is_seen_by_another_client(
    redis_url: str, redis_client: redis.Redis, keys: Keys
) -> None:
    first = RateLimiter(redis=redis_client, keys=keys, margin=MARGIN)
    other_client = redis.Redis.from_url(redis_url)
    try:
        # max_ahead 1 s: the paused slot is reported, not held (holding is tested above).
        other = RateLimiter(redis=other_client, keys=keys, margin=MARGIN, max_ahead=1.0)
        assert first.penalize("acme", 2.5) == 2.5
        seen: Reservation = other.reserve("acme", RATE, max_wait=1.0)
        assert not seen.granted
        assert seen.wait == pytest.approx(2.5, abs=0.05)
        with pytest.raises(SlotTooFar) as info:
            other.acquire("acme", RATE)
        # Come back when the slot is max_wait / 2 = 0.5 s away.
        assert info.value.retry_in == pytest.approx(2.0, abs=0.05)
        # Other keys are not paused.
        assert other.reserve("other", RATE, max_wait=0.0).wait == 0.0
    finally:
        other_client.close()


def test_penalty_default_cap_and_no_shortening(limiter: RateLimiter) -> None:
    assert limiter.penalize("a", None) == 1.0  # defaults.PENALTY_DEFAULT
    assert limiter.reserve("a", RATE, max_wait=0).wait == pytest.approx(1.0, abs=0.05)
    assert limiter.penalize("b", 10_000.0) == 60.0  # defaults.PENALTY_MAX
    assert limiter.penalize("b", float("nan")) == 60.0
    assert limiter.penalize("b", -3) == 0.0
    # A shorter penalty never brings a later slot closer.
    assert limiter.reserve("b", RATE, max_wait=0).wait == pytest.approx(60.0, abs=0.05)


def test_many_threads_never_share_a_window(limiter: RateLimiter) -> None:
    slots: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(40):
            b = limiter.reserve("acme", 20.0, max_wait=100.0)
            with lock:
                slots.append(b.slot)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(slots)) == 320  # no slot handed out twice
    # 1 / (1/20 + 5 ms) = 18.2 slots a second: 19 fit in a half-open window, never 21.
    assert max_in_window(slots) == 19


def test_script_survives_script_flush_and_redis_restart() -> None:
    with running_redis() as server:
        client = redis.Redis.from_url(server.url)
        lim = RateLimiter(redis=client, keys=Keys("t"), margin=MARGIN)
        assert lim.reserve("acme", RATE, max_wait=10).granted
        client.script_flush()
        after_flush = lim.reserve("acme", RATE, max_wait=10)
        assert after_flush.granted
        assert after_flush.wait == pytest.approx(INTERVAL, abs=0.01)  # state kept
        server.restart()  # no persistence: scripts and state are gone, connection broken
        after_restart = lim.reserve("acme", RATE, max_wait=10)
        assert after_restart.granted
        assert after_restart.wait == 0.0
        assert lim.reserve("acme", RATE, max_wait=10).wait == pytest.approx(INTERVAL, abs=0.01)
        client.close()


def test_one_redis_command_per_reservation() -> None:
    with running_redis() as server:
        client = redis.Redis.from_url(server.url)
        lim = RateLimiter(redis=client, keys=Keys("t"), margin=MARGIN)
        lim.reserve("acme", RATE, max_wait=10)  # loads the script (NOSCRIPT, SCRIPT LOAD)
        client.config_resetstat()
        for _ in range(50):
            lim.reserve("acme", RATE, max_wait=1000)
        for _ in range(10):
            lim.acquire("free-" + str(_), RATE)
        stats = client.info("commandstats")
        client.close()
    assert stats["cmdstat_evalsha"]["calls"] == 60
    # Commands run by the script are counted too; the client sent nothing else.
    sent = {k: v["calls"] for k, v in stats.items() if k not in ("cmdstat_evalsha",)}
    inside_script = {"cmdstat_get", "cmdstat_set", "cmdstat_time"}
    assert set(sent) <= {*inside_script, "cmdstat_config|resetstat"}


class FakeClock:
    """A monotonic clock that only moves when told: by the injected sleep, or by ``lag``
    seconds right after each Redis answer (an answer that sat unread on a starved CPU)."""

    def __init__(self, lags: list[float]) -> None:
        self.now = 1000.0
        self.lags = lags

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def delay_answers(self, limiter: RateLimiter) -> None:
        reserve = limiter._reserve  # the Redis round trip; wrapped to age its answer

        def aged(*args: object, **kwargs: object) -> object:
            answer = reserve(*args, **kwargs)
            self.now += self.lags.pop(0) if self.lags else 0.0
            return answer

        limiter._reserve = aged  # type: ignore[method-assign,assignment]


def late_slots(account: str) -> float:
    from worker import metrics

    return float(metrics.LIMITER_LATE.labels(account)._value.get())


def answers_read_late(limiter: RateLimiter, delays: list[float]) -> None:
    """Make the limiter's Redis answers sit unread for ``delays`` seconds, one per answer (a
    thread waiting for a CPU), for real: the wall clock and Redis's clock run on meanwhile."""
    reserve = limiter._reserve

    def read_late(*args: object, **kwargs: object) -> object:
        answer = reserve(*args, **kwargs)
        time.sleep(delays.pop(0) if delays else 0.0)
        return answer

    limiter._reserve = read_late  # type: ignore[method-assign,assignment]


def test_an_answer_read_late_counts_as_lateness_and_takes_a_fresh_slot(
    redis_client: redis.Redis, keys: Keys
) -> None:
    limiter = RateLimiter(redis=redis_client, keys=keys, margin=MARGIN)
    answers_read_late(limiter, [0.050])  # the first answer is read 50 ms after Redis wrote it
    assert limiter.late_limit(RATE) == pytest.approx(0.0125)  # half of 5 x 5 ms of slack
    before = late_slots("starved")
    booking = limiter.wait_for_slot("starved", RATE, 1.0)
    started = time.time()  # the same host: Redis's clock is this wall clock
    # The idle key's first slot was "now" when Redis answered, 50 ms before the caller could
    # read it: too late to use (a TIME probe confirmed it). The caller left it free and used
    # the next one, on time.
    assert limiter.clock_probes == 1
    assert late_slots("starved") == before + 1
    assert -0.001 <= started - booking.slot <= 0.015


def test_an_answer_read_promptly_is_used(redis_client: redis.Redis, keys: Keys) -> None:
    clock = FakeClock(lags=[0.010])  # within the 12.5 ms allowed
    limiter = RateLimiter(
        redis=redis_client, keys=keys, margin=MARGIN, sleep=clock.sleep, clock=clock
    )
    clock.delay_answers(limiter)
    before = late_slots("prompt")
    booking = limiter.wait_for_slot("prompt", RATE, 1.0)
    assert late_slots("prompt") == before
    assert booking.wait == 0.0


def test_late_for_the_fresh_slot_too_the_caller_gives_up(
    redis_client: redis.Redis, keys: Keys
) -> None:
    # A saturated host: the caller is late for its slot and for the fresh one. It sends
    # nothing (a late call risks a 429 that would pause the whole key) and says when to retry.
    limiter = RateLimiter(redis=redis_client, keys=keys, margin=MARGIN)
    answers_read_late(limiter, [0.050, 0.300])
    before = late_slots("saturated")
    with pytest.raises(SlotTooFar) as caught:
        limiter.wait_for_slot("saturated", RATE, 1.0)
    assert caught.value.retry_in == pytest.approx(INTERVAL)
    assert late_slots("saturated") == before + 2


def test_a_learnt_clock_keeps_an_on_time_slot_whose_answer_was_read_late(
    redis_client: redis.Redis, keys: Keys
) -> None:
    # A first, prompt round trip teaches where Redis's clock falls on ours. The second answer
    # sits unread for 50 ms, but its slot is 205 ms ahead: the caller still knows when that is
    # and sleeps 155 ms, instead of believing itself 50 ms late and giving the slot up.
    clock = FakeClock(lags=[0.0, 0.050])
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.sleep(seconds)

    limiter = RateLimiter(redis=redis_client, keys=keys, margin=MARGIN, sleep=sleep, clock=clock)
    clock.delay_answers(limiter)
    before = late_slots("taught")
    first = limiter.wait_for_slot("taught", RATE, 1.0)
    second = limiter.wait_for_slot("taught", RATE, 1.0)
    assert late_slots("taught") == before
    assert second.slot - first.slot == pytest.approx(INTERVAL, abs=2e-6)
    # Redis's clock ran on (for real) while the fake one stood still: the sleep is the slot's
    # distance from the first answer less the 50 ms spent reading, to within that real time.
    assert slept == [pytest.approx(INTERVAL - 0.050, abs=0.01)]
    assert limiter.lateness(second) == pytest.approx(0.0, abs=0.01)


def test_redis_clock_bounds_tighten_widen_and_reset() -> None:
    from worker.ratelimit.redis_clock import DRIFT, RedisClock

    model = RedisClock()
    assert model.bounds(0.0) is None
    first = model.observe(asked=10.0, answered=10.030, redis_now=110.010)  # a slow round trip
    assert (first.low, first.high) == pytest.approx((99.98, 100.01))
    tight = model.observe(asked=11.0, answered=11.001, redis_now=111.0)  # a fast one
    assert (tight.low, tight.high) == pytest.approx((99.999, 100.0), abs=DRIFT * 1.0 + 1e-9)
    later = model.bounds(21.0)  # ten seconds without news: drift may have moved it
    assert later is not None
    assert later.high - later.low == pytest.approx(0.001 + 2 * DRIFT * (21.0 - 11.001))
    stepped = model.observe(asked=21.0, answered=21.001, redis_now=131.5)  # clock stepped 0.5 s
    assert (stepped.low, stepped.high) == pytest.approx((110.499, 110.5))


def test_a_loose_clock_is_settled_by_one_probe_before_the_sleep(
    redis_client: redis.Redis, keys: Keys
) -> None:
    # A fresh process (nothing learnt) whose first answer sits unread for 40 ms, as in a
    # start-up herd. Sleeping "wait" from that answer would start 40 ms late and give the slot
    # up; one TIME probe places the slot instead, and the call starts on time.
    RateLimiter(redis=redis_client, keys=keys, margin=MARGIN).reserve("herd", RATE, 1.0)
    limiter = RateLimiter(redis=redis_client, keys=keys, margin=MARGIN)
    answers_read_late(limiter, [0.040])
    before = late_slots("herd")
    booking = limiter.wait_for_slot("herd", RATE, 1.0)
    started = time.time()  # the same host: Redis's clock is this wall clock
    assert booking.wait == pytest.approx(INTERVAL, abs=0.01)  # the slot after the other's
    assert limiter.clock_probes == 1
    assert late_slots("herd") == before
    assert -0.001 <= started - booking.slot <= 0.015  # not 40 ms late (generous for CI)


def test_a_wait_with_a_lead_returns_before_the_slot_and_wait_out_reaches_it(
    limiter: RateLimiter,
) -> None:
    """The client runs a create's sent-mark ``lead`` seconds before the slot, then sleeps the
    rest: the wait returns early by about the lead, and ``wait_out`` is never early."""
    limiter.book("acme", 5)()  # takes the free slot: the next is 0.205 s away
    wait = limiter.book("acme", 5)
    granted = wait(0.1)
    early = -limiter.lateness(granted.booking)
    assert 0.05 < early <= 0.1 + 0.02, early
    granted.wait_out()
    # At or after the slot: the lowest bound of Redis's clock has passed it.
    assert limiter.lateness(granted.booking) >= 0
    assert not granted.late()


def test_a_late_send_fences_the_key_by_its_lateness(
    limiter: RateLimiter, redis_client: redis.Redis, keys: Keys
) -> None:
    # A fresh key's slot is now; its next free slot now + 205 ms. Written 60 ms after its
    # slot (the sleep is the lateness), the fifth slot after the call must fall 1 s + margin
    # after it: the next free slot moves by the lateness less 20 ms (slack 25 ms less the 5 ms
    # margin). On time, nothing moves and no command is sent.
    assert limiter.send_slack(5.0) == pytest.approx(0.020)
    assert limiter.send_slack(1.0) == pytest.approx(limiter.late_limit(1.0))
    on_time = limiter.reserve("prompt", 5.0, 2.0)
    assert not limiter.fence_late_send(on_time, 5.0)
    booking = limiter.reserve("acme", 5.0, 2.0)
    before = int(stored_slot(redis_client, keys, "acme") or 0) / 1_000_000
    assert before == pytest.approx(booking.slot + 0.205, abs=1e-5)
    time.sleep(0.060)
    lateness = limiter.lateness(booking)
    assert limiter.fence_late_send(booking, 5.0)
    after = int(stored_slot(redis_client, keys, "acme") or 0) / 1_000_000
    # The fence read its own lateness a moment after this one: at least as late.
    assert lateness - 0.020 - 1e-6 <= after - before <= lateness - 0.020 + 0.010
    assert after - before >= 0.040 - 1e-6


def test_slots_booked_before_a_late_write_are_given_up_behind_it(
    limiter: RateLimiter, redis_client: redis.Redis, keys: Keys
) -> None:
    # Six slots booked back to back (local steps book a poll's slot when they start it), then
    # the first call's write is 60 ms late. The fence cannot move the five booked after it
    # (it moves nothing: the slot it would move is booked already); sent in its slot, the
    # fifth would be the sixth call in the late call's window, a 429. This process gives
    # that one up at its last check; the four between keep theirs.
    bookings = [limiter.reserve("acme", 5.0, 2.0) for _ in range(6)]
    assert all(b.granted for b in bookings)
    wait_until(lambda: limiter.lateness(bookings[0]) > 0.060, timeout=2, what="60 ms late")
    assert not limiter.fence_late_send(bookings[0], 5.0)
    late_before = metrics.LIMITER_LATE.labels("acme")._value.get()
    behind = [Granted(limiter, b, 5.0, 0.0).late() for b in bookings[1:]]
    assert behind == [False, False, False, False, True]
    assert metrics.LIMITER_LATE.labels("acme")._value.get() - late_before == 1
    # The next booking, the sixth after the late call, is clear of its window.
    after = limiter.reserve("acme", 5.0, 5.0)
    assert after.slot == pytest.approx(bookings[0].slot + 6 * 0.205, abs=1e-5)
    assert not limiter.behind_late_write(after, 5.0)
    # Another process (another limiter) did not see the late write: only the fence reaches it.
    elsewhere = RateLimiter(redis=redis_client, keys=keys, margin=MARGIN, max_wait=1.0)
    assert not elsewhere.behind_late_write(bookings[5], 5.0)
