"""The global per-API-key rate limiter: one Lua call in Redis per request, evenly spaced slots.

Every process that calls the API for an account asks Redis for that account's next free slot
(``reserve.lua``). Slots are ``1/rate + margin`` seconds apart on the Redis clock, so no sliding
1-second window ever holds more than ``rate`` calls, whatever the number of processes or hosts.
A slot within ``max_wait`` is booked and the caller sleeps until it. A slot further away but
within ``max_ahead`` is booked and *held*: the caller reschedules its job for just before it
instead of holding a worker thread, and hands the hold back when the job runs, so a granted call
costs one reservation however far its slot was. A slot beyond ``max_ahead`` is only reported
(nothing booked): the cap on how much of a key callers that die before their slot can waste.
Why evenly spaced rather than GCRA with a burst or a sliding log:
docs/benchmarks.md, "Rate limiter".
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from worker import defaults, metrics
from worker.errors import SlotTooFar
from worker.keys import Keys
from worker.lean_script import register_lean_script
from worker.ratelimit.redis_clock import OffsetBounds, RedisClock
from worker.ratelimit.reservation import Reservation

_MICRO = 1_000_000
LATE_REBOOKS = 1  # fresh slots a late caller may take before it gives up (SlotTooFar)
STALE_HOLD = 1.0  # seconds past its slot after which a hold is an old one, not a late caller
# A held slot's job is rescheduled for this share of max_wait before the slot: as early as the
# caller may sleep, less a tenth for the clocks, so that the sweeper's and the queue's delays
# make it later but not late.
HOLD_LEAD = 0.9


def _script_text(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


# reserve.lua's text, for scripts that book a slot in their own round trip (reserve_via).
RESERVE_SOURCE = _script_text("reserve.lua")


@dataclass(frozen=True)
class BookingRequest:
    """``RESERVE_SOURCE``'s keys and arguments for one booking (``RateLimiter.booking_request``)."""

    account: str
    keys: list[str]
    args: list[int]
    max_wait: float
    ahead: float


class RateLimiter:
    """Shares each API key's rate among every process using one Redis.

    ``margin`` (seconds) is added to each slot interval to absorb the jitter between a slot's
    time and the moment the API sees the call; ``max_wait`` (seconds) is how long ``acquire``
    sleeps at most; ``max_ahead`` (seconds, at least ``max_wait``) is how far ahead a slot is
    still booked and held for a caller who comes back for it, and thereby how far ahead a key
    can be booked; ``penalty_default`` is the pause after a 429 without Retry-After, and
    ``penalty_max`` caps any pause. ``sleep`` (a duration in seconds) and ``clock`` (monotonic
    seconds) are injectable for tests.
    """

    def __init__(
        self,
        *,
        redis: redis.Redis,
        keys: Keys,
        margin: float = defaults.RATE_MARGIN,
        max_wait: float = defaults.MAX_WAIT,
        max_ahead: float = defaults.MAX_AHEAD,
        penalty_default: float = defaults.PENALTY_DEFAULT,
        penalty_max: float = defaults.PENALTY_MAX,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        watch_master: bool = False,
    ) -> None:
        if min(margin, max_wait, max_ahead, penalty_default, penalty_max) < 0:
            raise ValueError("margin, max_wait, max_ahead and penalties must be >= 0 seconds")
        self.redis = redis
        self.keys = keys
        self.margin = margin
        self.max_wait = max_wait
        self.max_ahead = max_ahead
        self.penalty_default = penalty_default
        self.penalty_max = penalty_max
        # Under Sentinel: each key waits out one window on a new master (reserve.lua).
        self.watch_master = watch_master
        self._sleep = sleep
        self._clock = clock
        self.redis_clock = RedisClock()
        self.clock_probes = 0  # TIME commands sent by probe_clock (benchmarks count commands)
        self._probe_lock = threading.Lock()
        # account -> (slot, latest it reached the wire) of this process's latest late write,
        # Redis clock: the slots the fence cannot move (booked before it) are checked here.
        self._late_writes: dict[str, tuple[float, float]] = {}
        # Nothing is sent now: calls use EVALSHA, and the script is loaded and run again on
        # NOSCRIPT (after SCRIPT FLUSH or a Redis restart). Lean: one runs per API call.
        self._reserve = register_lean_script(redis, RESERVE_SOURCE)
        self._penalize = register_lean_script(redis, _script_text("penalize.lua"))
        self._fence = register_lean_script(redis, _script_text("fence.lua"))

    def interval(self, rate: float) -> float:
        """Seconds between two slots of a key limited to ``rate`` calls per second.

        A window can only hold a whole number of calls, so a fractional rate above 1 is rounded
        down (7.5/s spaces calls 1/7 s apart: spacing them 1/7.5 s would let 8 into a window).
        A rate below 1 means one call every ``1/rate`` seconds.
        """
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        calls = math.floor(rate) if rate >= 1 else rate
        return 1.0 / calls + self.margin

    def reserve(
        self, account: str, rate: float, max_wait: float, max_ahead: float | None = None
    ) -> Reservation:
        """Book ``account``'s next free slot if it is at most ``max_ahead`` seconds away
        (default: the limiter's; never less than ``max_wait``).

        One EVALSHA, no sleeping. The returned reservation says when the slot is (Redis clock),
        whether it was booked, and whether it is held (booked, but further than ``max_wait``);
        a slot further than ``max_ahead`` is not booked.
        """
        booking = self.reserve_via(
            lambda keys, args: self._reserve(keys=keys, args=args),
            account,
            rate,
            max_wait,
            max_ahead,
        )
        assert booking is not None  # reserve.lua always answers
        return booking

    def reserve_via(
        self,
        run: Callable[[list[str], list[int]], Sequence[Any] | None],
        account: str,
        rate: float,
        max_wait: float,
        max_ahead: float | None = None,
    ) -> Reservation | None:
        """``reserve``, inside a caller's own round trip: ``run(keys, args)`` sends a script
        that runs ``RESERVE_SOURCE`` with these keys and args (with its own work, on one
        slot of a cluster: every limiter key carries the account's hash tag) and returns that
        part's answer, or None when its script did not book (nothing was reserved). The
        limiter times the round trip, learns the Redis clock from it and reads the answer as
        ``reserve`` does; None when ``run`` returned None."""
        request = self.booking_request(account, rate, max_wait, max_ahead)
        asked_at = self._clock()
        raw = run(request.keys, request.args)
        answered_at = self._clock()
        if raw is None:
            return None
        return self.read_booking(request, raw, asked_at, answered_at)

    def booking_request(
        self, account: str, rate: float, max_wait: float, max_ahead: float | None = None
    ) -> BookingRequest:
        """The keys and arguments of ``RESERVE_SOURCE`` that book ``account``'s next slot (for
        a caller that sends the script itself, several in one round trip: ``read_booking``
        reads each answer)."""
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait!r}")
        ahead = max(self.max_ahead if max_ahead is None else max_ahead, max_wait)
        # Rounded up: an interval one microsecond too long costs nothing, one too short could
        # put rate + 1 calls in a window.
        interval_us = math.ceil(self.interval(rate) * _MICRO)
        args = [interval_us, int(max_wait * _MICRO), int(ahead * _MICRO)]
        keys = [self.keys.limiter(account)]
        if self.watch_master:
            keys.append(self.keys.limiter_master(account))
            args += [1, _MICRO + math.ceil(self.margin * _MICRO)]
        return BookingRequest(account, keys, args, max_wait, ahead)

    def read_booking(
        self, request: BookingRequest, raw: Sequence[Any], asked_at: float, answered_at: float
    ) -> Reservation:
        """The reservation ``RESERVE_SOURCE`` answered ``raw`` for ``request``, in a round trip
        sent at ``asked_at`` and answered at ``answered_at`` (this limiter's clock, ``clock``):
        the round trip teaches the clock model."""
        slot_us, now_us, granted = (int(x) for x in raw)
        self.redis_clock.observe(asked_at, answered_at, now_us / _MICRO)
        wait = (slot_us - now_us) / _MICRO
        if granted == 1:
            retry_in = 0.0
        elif granted == 2:  # held: come back as early as the caller may sleep for it
            retry_in = max(0.0, wait - HOLD_LEAD * request.max_wait)
        else:
            retry_in = max(0.0, wait - request.ahead / 2)
        return Reservation(
            account=request.account,
            slot=slot_us / _MICRO,
            now=now_us / _MICRO,
            wait=wait,
            granted=granted != 0,
            retry_in=retry_in,
            asked_at=asked_at,
            answered_at=answered_at,
            held=granted == 2,
        )

    def clock(self) -> float:
        """This limiter's clock (``time.monotonic`` unless given): what ``read_booking``'s
        ``asked_at`` and ``answered_at`` are read on."""
        return self._clock()

    def held(self, account: str, slot: float) -> Reservation | None:
        """The reservation of a slot booked earlier and held (``SlotTooFar.hold``), placed by
        this process's clock model; None when the hold is stale (more than ``STALE_HOLD``
        seconds past: the job came back that late, and the caller should book a fresh slot;
        counted as a late slot).

        No command, except one ``TIME`` probe in a process that has no clock model yet. The
        reservation carries the model's bounds as its own round trip.
        """
        now = self._clock()
        bounds = self.redis_clock.bounds(now)
        if bounds is None:
            self.probe_clock()
            now = self._clock()
            bounds = self.redis_clock.bounds(now)
            assert bounds is not None  # a probe always leaves a model
        # A round trip equivalent to the model: Redis read `now + low` while the caller's
        # clock went from `now - (high - low)` to `now`.
        redis_now = now + bounds.low
        if redis_now - slot > STALE_HOLD:
            metrics.record_late_slot(account)  # the job came back too late: the slot went unused
            return None
        return Reservation(
            account=account,
            slot=slot,
            now=redis_now,
            wait=slot - redis_now,
            granted=True,
            retry_in=0.0,
            asked_at=now - (bounds.high - bounds.low),
            answered_at=now,
            held=True,
        )

    def until(self, slot: float) -> float:
        """Seconds from now (this process's clock) to the latest local time at which ``slot``
        (Redis clock) can fall, by the clock model: when a caller that must never be early
        may start for it (negative: past). 0.0 while the process has no clock model yet
        (the call's own path then places the slot). No command."""
        now = self._clock()
        bounds = self.redis_clock.bounds(now)
        if bounds is None:
            return 0.0
        return slot - bounds.low - now

    def _offset(self, booking: Reservation, now: float) -> OffsetBounds:
        """Bounds on ``redis - local`` at local time ``now``: the clock model's, which always
        include ``booking``'s own round trip (its bounds, if the model was reset since)."""
        own = OffsetBounds(
            booking.now - booking.answered_at, booking.now - booking.asked_at, booking.answered_at
        ).widened(now)
        learnt = self.redis_clock.bounds(now)
        if learnt is None or max(learnt.low, own.low) > min(learnt.high, own.high):
            return own
        return OffsetBounds(max(learnt.low, own.low), min(learnt.high, own.high), now)

    def sleep_until(self, booking: Reservation, lead: float = 0.0) -> None:
        """Sleep until the latest local time at which ``booking``'s slot can fall: never early
        (``lead`` seconds before it: the caller has work to do first, then sleeps the rest).

        That is ``wait`` after the answer when nothing else is known; with a learnt clock it
        is the slot's true time to within the fastest round trip seen, however long this
        answer sat unread.
        """
        now = self._clock()
        remaining = booking.slot - self._offset(booking, now).low - now - max(0.0, lead)
        if remaining > 0:
            self._sleep(remaining)

    def lateness(self, booking: Reservation) -> float:
        """How late it is now for ``booking``'s slot, in seconds, at most.

        An overestimate by the uncertainty of the clock model (or, without one, by this
        reservation's round trip): an answer read late, on a starved CPU, is a slot already
        that late, and counts as such.
        """
        now = self._clock()
        return now - (booking.slot - self._offset(booking, now).high)

    @staticmethod
    def window_calls(rate: float) -> int:
        """How many calls one 1-second window may hold at ``rate`` (at least 1)."""
        return math.floor(rate) if rate >= 1 else 1

    def window_slack(self, rate: float) -> float:
        """The slack evenly spaced slots leave in every window: ``calls * interval - 1 s``
        (25 ms at 5/s with a 5 ms margin; the margin's multiple, 0 without one)."""
        calls = self.window_calls(rate)
        return calls * self.interval(rate) - max(1.0, calls / rate)

    def late_limit(self, rate: float) -> float:
        """How late after its slot a call may start (seconds) before it takes a fresh slot.

        Evenly spaced slots leave ``calls * interval - 1 s`` of slack in every window (25 ms at
        5/s with a 5 ms margin): a call starting later than that after its slot could share a
        window with the call ``rate`` slots after it. Half the slack is allowed for the wake-up;
        the other half is kept for the send itself.
        """
        slack = self.window_slack(rate)
        return slack / 2 if slack > 0 else math.inf

    def send_slack(self, rate: float) -> float:
        """How late after its slot a call may reach the wire (seconds) without a fence: the
        window's slack less the margin (the API's clock and the path to it), ``calls *
        interval - 1 s - margin`` (20 ms at 5/s with the 5 ms margin), and never less than
        ``late_limit`` (at 1/s that difference is 0: every call would be fenced)."""
        return max(self.late_limit(rate), self.window_slack(rate) - self.margin)

    def fence_late_send(self, booking: Reservation, rate: float) -> bool:
        """Called once a call's first write is done: when it may have reached the wire later
        than ``send_slack`` after ``booking``'s slot, move the key's next free slot so that the
        call ``rate`` slots later falls a window after it (fence.lua), for every process.
        True when the key's slot moved.

        The check before the write (``Granted.late``) cannot see a thread that loses the CPU
        between it and the write (the GIL, a stolen vCPU): measured in the throughput
        benchmark, a call that passed its check 3 ms after its slot reached the API 27 ms
        later, and the fifth call after it drew a 429. This reading, after the write, is
        never early (it may be late by the time the thread took to get the GIL back: then the
        key loses a few milliseconds, once). One command, for late calls only.
        """
        lateness = self.lateness(booking)
        if lateness <= self.send_slack(rate):
            return False
        self._late_writes[booking.account] = (booking.slot, booking.slot + lateness)
        raw: Any = self._fence(
            keys=[self.keys.limiter(booking.account)],
            args=[
                math.floor(booking.slot * _MICRO),
                math.ceil((booking.slot + lateness) * _MICRO),
                math.ceil(self.interval(rate) * _MICRO),
                self.window_calls(rate),
                _MICRO + math.ceil(self.margin * _MICRO),
            ],
        )
        metrics.record_late_send(booking.account)
        return int(raw[2]) == 1

    def behind_late_write(self, booking: Reservation, rate: float) -> bool:
        """True when ``booking``'s slot, booked before a late write of this process on the same
        key fenced it, now falls in that write's window with ``calls`` others: sending in it
        would be a 429. The fence moves the key's next free slot for every process, but not
        slots already booked (local steps book a poll's slot when they start it, up to
        ``max_ahead`` before); the caller gives such a slot up, as it does one it is late for.
        Checked in this process only (no Redis command): a booking another process holds is
        not seen here."""
        late = self._late_writes.get(booking.account)
        if late is None:
            return False
        late_slot, sent = late
        if booking.slot <= late_slot:
            return False
        if booking.slot >= sent + 1.0 + self.margin - 1e-6:  # (1 us: the script rounds up)
            # Past the window, and checked at its slot: any slot inside the window is past
            # too (sent, or too late to send). Forget the write, unless a newer one replaced it.
            if self._late_writes.get(booking.account) is late:
                self._late_writes.pop(booking.account, None)
            return False
        # The booking is the k-th slot after the late call's; the late call and the
        # calls - 1 slots after it already fill the window.
        k = round((booking.slot - late_slot) / self.interval(rate))
        return k >= self.window_calls(rate)

    def book_slot(self, account: str, rate: float, max_wait: float) -> Reservation:
        """Book ``account``'s next slot within ``max_wait`` and return it, without sleeping.

        Raises ``SlotTooFar`` when the slot is further: with ``hold`` set when it was booked
        and held for the caller (within ``max_ahead``), without when nothing was booked.
        """
        booking = self.reserve(account, rate, max_wait)
        if booking.held:
            raise SlotTooFar(account, booking.retry_in, hold=booking.slot)
        if not booking.granted:
            raise SlotTooFar(account, booking.retry_in)
        return booking

    def use_slot(
        self, booking: Reservation, rate: float, max_wait: float, lead: float = 0.0
    ) -> Reservation:
        """Sleep until ``booking``'s slot and return the slot to send in (``booking`` or a
        fresh one); never return a slot the caller is known to be late for.

        A caller that is more than ``late_limit`` past its slot when it gets here (a
        CPU-starved host, a thundering herd at start-up, a slow connect) leaves that slot
        unused (a gap is always safe) and books one fresh slot. Late for that one too, it
        gives up with ``SlotTooFar`` (nothing more booked; the job is rescheduled, one slot
        later): a call sent that late can share a window with the call ``rate`` slots after
        it, and the 429 would pause the whole key. So a call costs at most two Redis calls
        and a saturated host slows down instead of drawing 429s. The fresh slot may also
        simply be too far: ``SlotTooFar``.
        """
        late_limit = self.late_limit(rate)
        for attempt in range(LATE_REBOOKS + 1):
            if attempt:
                metrics.record_late_slot(booking.account)
                booking = self.book_slot(booking.account, rate, max_wait)
            # The clock model too loose to place the slot (typically a thundering herd at
            # start-up: every answer read late) costs a late start or a wasted slot; one TIME
            # round trip settles it, before the sleep if there is time, else after it.
            loose = self._uncertainty(booking) > late_limit / 2
            if loose and self._until_slot(booking) > late_limit:
                loose = not self._settle_clock(booking, late_limit / 2)
            self.sleep_until(booking, lead)
            if self.lateness(booking) <= late_limit:
                return booking
            settled = loose and self._settle_clock(booking, late_limit / 2)
            if settled and self.lateness(booking) <= late_limit:
                return booking
        metrics.record_late_slot(booking.account)
        raise SlotTooFar(booking.account, self.interval(rate))

    def _settle_clock(self, booking: Reservation, tolerance: float) -> bool:
        """Make the clock model place ``booking``'s slot to within ``tolerance`` seconds, with
        one TIME probe if no other thread's probe or answer has done it meanwhile; return
        whether it does now."""
        with self._probe_lock:  # one probe serves every waiting thread of the process
            if self._uncertainty(booking) > tolerance:
                self.probe_clock()
            return self._uncertainty(booking) <= tolerance

    def _until_slot(self, booking: Reservation) -> float:
        """Seconds from now to the earliest local time ``booking``'s slot can fall at."""
        now = self._clock()
        return booking.slot - self._offset(booking, now).high - now

    def _uncertainty(self, booking: Reservation) -> float:
        """How wide the clock model's bounds are for ``booking`` now, in seconds."""
        bounds = self._offset(booking, self._clock())
        return bounds.high - bounds.low

    def probe_clock(self) -> None:
        """Read Redis ``TIME`` once to tighten the clock model (one command)."""
        asked_at = self._clock()
        seconds, micros = self.redis.time()
        answered_at = self._clock()
        self.redis_clock.observe(asked_at, answered_at, seconds + micros / _MICRO)
        self.clock_probes += 1

    def wait_for_slot(self, account: str, rate: float, max_wait: float) -> Reservation:
        """Book ``account``'s next slot within ``max_wait``, sleep until it and return it
        (``book_slot`` then ``use_slot``)."""
        return self.use_slot(self.book_slot(account, rate, max_wait), rate, max_wait)

    def book(
        self,
        account: str,
        rate: float,
        *,
        max_wait: float | None = None,
        hold: float | None = None,
    ) -> Callable[..., Granted]:
        """Book ``account``'s next slot now (or take up the slot ``hold`` that an earlier
        ``SlotTooFar`` held for this caller); return the function that waits for it.

        When the slot is at most ``max_wait`` seconds away (default: the limiter's), calling
        the returned function sleeps until it (``use_slot``) and returns it as ``Granted``
        (``waited``: the seconds since this call): the caller may send on return. Called with
        ``lead``, it returns that many seconds before the slot, for work that must come right
        before the send (a create's sent-mark), and the caller sleeps the rest with
        ``Granted.wait_out()``. Otherwise
        ``SlotTooFar(account, retry_in, hold)`` is raised (by this call, or by the wait when
        the caller was late for its slot and its fresh one): the job should be rescheduled for
        ``retry_in`` seconds from now rather than hold a thread, and pass ``hold`` back here
        when it runs again. A hold costs no reservation; a stale one (more than 1 s past) is
        counted as a late slot and a fresh slot booked.

        Two steps so that the client can make its connection in between: a connect after
        the slot would make the call late (worker/api/send_gate.py).
        """
        wait = self.max_wait if max_wait is None else max_wait
        started = self._clock()
        booking = None if hold is None else self.held(account, hold)
        try:
            if booking is None:
                booking = self.book_slot(account, rate, wait)
            elif booking.wait > wait:  # back too early for its hold: come back again
                raise SlotTooFar(account, booking.wait - HOLD_LEAD * wait, hold=hold)
        except SlotTooFar:
            metrics.record_far_slot(account)
            raise

        def wait_for_it(lead: float = 0.0) -> Granted:
            try:
                used = self.use_slot(booking, rate, wait, lead)
            except SlotTooFar:
                metrics.record_far_slot(account)
                raise
            waited = self._clock() - started
            metrics.record_limiter_grant(account, waited)
            return Granted(self, used, rate, waited)

        return wait_for_it

    def acquire(
        self,
        account: str,
        rate: float,
        *,
        max_wait: float | None = None,
        hold: float | None = None,
    ) -> float:
        """Book ``account``'s next slot and wait for it (``book`` and its wait in one call);
        return the seconds spent. Raises ``SlotTooFar`` when the slot is too far."""
        return self.book(account, rate, max_wait=max_wait, hold=hold)().waited

    def penalize(self, account: str, retry_after: float | None) -> float:
        """After a 429, pause ``account`` for every process; return the pause applied (seconds).

        The key's next free slot becomes at least now + ``retry_after`` (the server's
        Retry-After, or ``penalty_default`` when it sent none), capped at ``penalty_max`` so that
        a broken header cannot stall the key. Slots booked before the penalty (at most
        ``rate * max_ahead`` of them, being slept on or held) are not revoked.
        """
        pause = self.penalty_default if retry_after is None else retry_after
        if not math.isfinite(pause):
            pause = self.penalty_max
        pause = min(max(pause, 0.0), self.penalty_max)
        self._penalize(keys=[self.keys.limiter(account)], args=[int(pause * _MICRO)])
        metrics.record_penalty(account)
        return pause


class Granted:
    """A slot waited for (``RateLimiter.book``): ``waited`` seconds; ``late()`` tells whether
    what the caller did since (a slow Redis write marking a create as sent) has made it too
    late to send in it, by the limiter's ``late_limit``."""

    def __init__(self, limiter: RateLimiter, booking: Reservation, rate: float, waited: float):
        self._limiter = limiter
        self.booking = booking
        self._rate = rate
        self.waited = waited

    def wait_out(self) -> None:
        """Sleep until the slot itself (after a wait with a ``lead``): never early."""
        self._limiter.sleep_until(self.booking)

    def late(self) -> bool:
        """True (and counted as a late slot) when the caller must not send now: it is past
        ``late_limit`` after the slot, or the slot is behind a late write
        (``RateLimiter.behind_late_write``)."""
        limiter = self._limiter
        if limiter.lateness(self.booking) <= limiter.late_limit(
            self._rate
        ) and not limiter.behind_late_write(self.booking, self._rate):
            return False
        metrics.record_late_slot(self.booking.account)
        return True

    def sent(self) -> None:
        """The call's first byte is written: fence the key if that was too late
        (``RateLimiter.fence_late_send``). Raises RedisError."""
        self._limiter.fence_late_send(self.booking, self._rate)
