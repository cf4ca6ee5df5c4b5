"""A poll's first round trip: own the track step, read the payment's record and book the key's
next slot for its GET, in one script.

A poll was three scripts around its GET: start_step.lua (the step's ownership and the record),
reserve.lua (the key's slot), transition.lua (the outcome). The first two now go in one
round trip (poll_start.lua, composed with the other two's own texts, so the limiter's and the
store's Lua each stay in one place): a Redis command less per poll, for the worker's CPU and
for Redis's. The booked slot reaches the GET as a *held* slot (``RateLimiter.held``, no
command), the path a rescheduled far-slot job already takes, so the limiter's guarantees are
the ones it gives every call. Every key of one account carries the account's hash tag, so the
script touches one slot of a Redis Cluster.

A slot is booked only for a step this process now owns whose record is pending and holds no
slot of its own; a step that then finds its tracking deadline passed leaves its slot unused
(a gap is always safe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from worker.keys import Keys
from worker.lean_script import call_many, register_lean_script
from worker.ratelimit import RateLimiter
from worker.ratelimit.limiter import RESERVE_SOURCE, BookingRequest
from worker.store import PaymentRecord, State
from worker.store.store import START_STEP_SOURCE


def _as_function(name: str, source: str) -> str:
    """A script's text as a Lua function of (KEYS, ARGV): its ``return`` returns from it."""
    return f"local function {name}(KEYS, ARGV)\n{source}\nend\n"


POLL_START_SOURCE = "".join(
    [
        _as_function("start_step", START_STEP_SOURCE),
        _as_function("reserve", RESERVE_SOURCE),
        resources.files(__package__).joinpath("poll_start.lua").read_text(encoding="utf-8"),
    ]
)


@dataclass(frozen=True)
class PollStart:
    """What a poll's first round trip read and booked."""

    record: PaymentRecord | None
    #: the slot (Redis clock, seconds) booked for this poll's GET: pass it as ``hold``; None
    #: when none was (the record holds one already, or it is not pending, or the step was not
    #: in flight, or the key's next slot is beyond the limiter's ``max_ahead``)
    slot: float | None


class PollStarter:
    """Starts track steps with their slot booked in the same round trip."""

    def __init__(self, *, redis_client: redis.Redis, keys: Keys, limiter: RateLimiter) -> None:
        self.keys = keys
        self.limiter = limiter
        self._script: Script = register_lean_script(redis_client, POLL_START_SOURCE)

    def start(
        self,
        account: str,
        reference_id: str,
        *,
        owner: str,
        lease: float,
        rate: float,
        max_wait: float,
    ) -> PollStart:
        """Start the in-flight track step of (account, reference_id) as ``owner`` (as
        ``PaymentStore.start_step`` does) and book ``account``'s next slot for its GET at
        ``rate`` (as ``RateLimiter.reserve`` does with ``max_wait``)."""
        request = self.limiter.booking_request(account, rate, max_wait)
        asked_at = self.limiter.clock()
        call = self._call(request, reference_id, owner, lease)
        raw = self._script(keys=call["keys"], args=call["args"])
        return self._read(request, raw, asked_at, self.limiter.clock())

    def start_many(
        self,
        polls: Sequence[tuple[str, str, float]],
        *,
        owner: str,
        lease: float,
        max_wait: float,
    ) -> list[PollStart | Exception]:
        """:meth:`start` for each (account, reference_id, rate) of ``polls``, in one round
        trip where the client allows (``lean_script.call_many``); each start, or the error
        its script raised. A connection error is raised: none, some or all of them ran."""
        requests = [self.limiter.booking_request(a, rate, max_wait) for a, _, rate in polls]
        calls = []
        for request, (_, reference_id, _) in zip(requests, polls, strict=True):
            call = self._call(request, reference_id, owner, lease)
            calls.append((call["keys"], call["args"]))
        asked_at = self.limiter.clock()
        answers = call_many(self._script, calls)
        answered_at = self.limiter.clock()
        return [
            raw if isinstance(raw, Exception) else self._read(request, raw, asked_at, answered_at)
            for request, raw in zip(requests, answers, strict=True)
        ]

    def _call(
        self, request: BookingRequest, reference_id: str, owner: str, lease: float
    ) -> dict[str, list[Any]]:
        k, account = self.keys, request.account
        return {
            "keys": [
                k.inflight(account, "track"),
                k.owners(account),
                k.payment(account, reference_id),
                *request.keys,
            ],
            "args": [reference_id, "track", owner, lease, State.PENDING.value, *request.args],
        }

    def _read(
        self, request: BookingRequest, raw: Sequence[Any], asked_at: float, answered_at: float
    ) -> PollStart:
        flat = raw[1]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        record = PaymentRecord.from_hash(fields) if fields else None
        slot = None
        if len(raw) > 2:
            booking = self.limiter.read_booking(request, raw[2:5], asked_at, answered_at)
            slot = booking.slot if booking.granted else None
        return PollStart(record, slot)
