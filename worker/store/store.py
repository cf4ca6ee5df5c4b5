"""PaymentStore: every read and write of payment records, one Lua call per change."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from worker import defaults
from worker.errors import ValidationError
from worker.keys import Keys
from worker.lean_script import call_many, register_lean_script
from worker.script_batch import ScriptBatch
from worker.store.records import PaymentRecord, PaymentSpec
from worker.store.states import ALL_STATES, FINAL, State, sources_of

STEPS = ("create", "track")

NOW = "$now"
"""A field value the store replaces by the Redis time of the change."""


def now_plus(seconds: float) -> str:
    """A field value the store replaces by the Redis time of the change plus ``seconds``."""
    return f"$now+{seconds:.6f}"


def _load(name: str) -> str:
    return resources.files("worker.store").joinpath(name).read_text(encoding="utf-8")


# start_step.lua's text, for a script that starts a step with more work in the same round trip
# (worker/steps/poll_start.py).
START_STEP_SOURCE = _load("start_step.lua")


def _seconds(value: float) -> str:
    """Seconds as Lua reads them (an infinite bound as a very large one)."""
    return "1e15" if math.isinf(value) else f"{value:.6f}"


def _not_before_arg(next_step: str, not_before: float | None, holds_slot: bool) -> str:
    """transition.lua's ARGV[11]: '' (no early pull), 'held', or the not-before in seconds
    (tracks only)."""
    if holds_slot:
        return "held"
    if next_step != "track":
        return ""
    return "" if not_before is None else f"{max(not_before, 0.0):.6f}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Transition:
    """The answer of :meth:`PaymentStore.transition`."""

    moved: bool
    previous: str  # the state before (or the current state, when not moved); "" if no record
    now: float = 0.0
    submitted_at: float | None = None
    polls: int = 0
    attempts: int = 0


def read_transition(reply: Sequence[Any]) -> Transition:
    """The :class:`Transition` a transition.lua reply says."""
    code = int(reply[0])
    if code == -1:
        return Transition(moved=False, previous="")
    if code == 0:
        return Transition(moved=False, previous=_text(reply[1]))
    return Transition(
        moved=True,
        previous=_text(reply[1]),
        now=float(reply[2]),
        submitted_at=float(reply[3]) if reply[3] else None,
        polls=int(reply[4]),
        attempts=int(reply[5]),
    )


@dataclass(frozen=True)
class TransitionWrite:
    """A transition to write (:meth:`PaymentStore.write`): :meth:`PaymentStore.transition`'s
    arguments, as data, so that a step can decide its outcome and leave the write to a batch."""

    account: str
    reference_id: str
    target: State
    #: the keyword arguments of :meth:`PaymentStore.transition`
    options: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """Steps of one account claimed for dispatch by :meth:`PaymentStore.claim_due`."""

    now: float
    recovered: int  # steps whose lease had run out and were put back (lost work)
    most_overdue: float  # seconds the oldest due step is late (0 when none is)
    creates: list[str]
    tracks: list[str]
    creates_due: int = 0  # creates still due after this claim (a create backlog)
    tracks_due: int = 0  # tracks still due after this claim (polls waiting for the budget)
    held_tracks: int = 0  # of ``tracks``, those holding a slot (claimed outside the pace)
    held_creates: int = 0  # of ``creates``, those holding a slot (outside the creates' pace)
    outbox: int = 0  # events in the account's outbox, to relay (Redis Cluster only)


@dataclass(frozen=True)
class TrackPace:
    """How :meth:`PaymentStore.claim_due` claims tracks under the poll planner."""

    polls: int  # most tracks claimed in this call
    starve_after: float = math.inf  # seconds past its not-before that a track counts as starved
    pull: bool = True  # spare pace pulls the soonest tracks forward (past their not-before)
    creates: int = -1  # most creates claimed in this call (-1: the in-flight budget decides)


UNPACED = TrackPace(-1)  # tracks share the in-flight budget, after the creates (backoff policy)


class PaymentStore:
    """Payment records, their state sets, their schedule and the events stream in Redis."""

    def __init__(
        self,
        *,
        redis: redis.Redis,
        keys: Keys,
        events_maxlen: int = defaults.EVENTS_MAXLEN,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.events_maxlen = events_maxlen
        # Lean scripts (worker/lean_script.py): a poll's outcome is one of these.
        self._submit = register_lean_script(redis, _load("submit.lua"))
        self._transition = register_lean_script(redis, _load("transition.lua"))
        self._claim = register_lean_script(redis, _load("claim.lua"))
        self._start_step = register_lean_script(redis, START_STEP_SOURCE)
        self._put_back = redis.register_script(_load("put_back.lua"))

    # --- producers ------------------------------------------------------------------------------
    def _submit_args(self, spec: PaymentSpec) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [
            k.payment(spec.account, spec.reference_id),
            k.by_state(spec.account, State.QUEUED),
            k.due(spec.account, "create"),
            k.events_written(spec.account),
        ]
        args: list[Any] = [
            spec.account,
            spec.reference_id,
            State.QUEUED.value,
            self.events_maxlen,
            3,
            "amount",
            spec.amount,
            "currency",
            spec.currency,
            "redirect_url",
            spec.redirect_url,
        ]
        return keys, args

    @staticmethod
    def _check_existing(spec: PaymentSpec, reply: Sequence[Any]) -> bool:
        """True when ``reply`` says "recorded now"; False for an identical existing payment."""
        if int(reply[0]) == 1:
            return True
        stored = {_text(reply[i]): _text(reply[i + 1]) for i in range(2, len(reply), 2)}
        wanted = {
            "amount": spec.amount,
            "currency": spec.currency,
            "redirect_url": spec.redirect_url,
        }
        if stored != wanted:
            raise ValidationError(
                "reference_id",
                f"{spec.reference_id!r} is already used by another payment of account "
                f"{spec.account!r} (state {_text(reply[1])}) with different details",
            )
        return False

    def submit(self, spec: PaymentSpec) -> bool:
        """Record ``spec`` as ``queued`` with its create due now.

        Idempotent: True when recorded, False when the same payment was already there; raises
        ValidationError when the reference_id is taken by a payment with other details.
        """
        return self._check_existing(spec, self._submit_replies([spec])[0])

    def _submit_replies(self, specs: Sequence[PaymentSpec]) -> list[Any]:
        """The submit script's reply for each spec, recorded in one pipelined round trip (two
        on a cluster), their accounts listed first."""
        # The accounts are listed first: the sweeper finds work through that set, which is in
        # another hash slot than the accounts' keys (no script can write both on a cluster). An
        # account listed whose payments then fail to record is harmless.
        if not specs:
            return []
        batch = ScriptBatch(
            self.redis, head=[("SADD", self.keys.accounts(), *sorted({s.account for s in specs}))]
        )
        for spec in specs:
            batch.add(self._submit, *self._submit_args(spec))
        return batch.execute()

    def submit_many(self, specs: Sequence[PaymentSpec]) -> list[bool | ValidationError]:
        """Submit a batch in one pipelined round trip; per spec True/False or the error."""
        results: list[bool | ValidationError] = []
        for spec, reply in zip(specs, self._submit_replies(specs), strict=True):
            try:
                results.append(self._check_existing(spec, reply))
            except ValidationError as exc:
                results.append(exc)
        return results

    def register_tracking(self, account: str, reference_id: str, payment_id: str) -> bool:
        """Record a payment created elsewhere as ``pending`` with its first poll due now.

        True when recorded; False when this (account, reference_id) already exists with the
        same payment id; ValidationError when it exists with another.
        """
        k = self.keys
        batch = ScriptBatch(self.redis, head=[("SADD", k.accounts(), account)])
        batch.add(
            self._submit,
            [
                k.payment(account, reference_id),
                k.by_state(account, State.PENDING),
                k.due(account, "track"),
                k.events_written(account),
                k.pending_age(account),
            ],
            [
                account,
                reference_id,
                State.PENDING.value,
                self.events_maxlen,
                1,
                "payment_id",
                payment_id,
                "created_at",
                NOW,
            ],
        )
        reply = batch.execute()[0]
        if int(reply[0]) == 1:
            # created_at is when paypoll started tracking it: the deadline counts from there.
            return True
        if _text(reply[3]) != payment_id:
            raise ValidationError(
                "reference_id", f"{reference_id!r} already tracks payment {_text(reply[3])!r}"
            )
        return False

    # --- workers --------------------------------------------------------------------------------
    def transition(
        self,
        account: str,
        reference_id: str,
        target: State,
        *,
        sources: Iterable[State] | None = None,
        next_step: str = "",
        delay: float = 0.0,
        fields: Mapping[str, str | int | float] | None = None,
        increments: Mapping[str, int] | None = None,
        guard: tuple[str, str] | None = None,
        operator: bool = False,
        not_before: float | None = None,
        holds_slot: bool = False,
    ) -> Transition:
        """Move a payment to ``target`` if it is in one of ``sources`` (default: every state
        the state machine allows to move there), set ``fields``, add ``increments``, and
        schedule ``next_step`` ('create', 'track' or '' for none) ``delay`` seconds from now.

        ``guard=(field, value)`` additionally requires the record's field to hold value ("" for
        unset): a compare-and-set between concurrent deliveries of one message.
        ``not_before`` (a next track only): seconds from now before which the poll planner may
        not pull the poll forward when its key has budget to spare; None: never before its due
        time. ``holds_slot``: the next step holds a rate-limit slot (a far slot held for it), so
        it is claimed when due outside the pace (polls' or creates') and the in-flight budget,
        and never pulled. Atomic; an event is appended to the stream when the state changes.
        """
        keys, args = self.transition_call(
            account,
            reference_id,
            target,
            sources=sources,
            next_step=next_step,
            delay=delay,
            fields=fields,
            increments=increments,
            guard=guard,
            operator=operator,
            not_before=not_before,
            holds_slot=holds_slot,
        )
        return read_transition(self._transition(keys=keys, args=args))

    def write(self, write: TransitionWrite) -> Transition:
        """:meth:`transition` with the arguments of ``write``."""
        return self.transition(write.account, write.reference_id, write.target, **write.options)

    def write_many(self, writes: Sequence[TransitionWrite]) -> list[Transition | Exception]:
        """Each of ``writes``, as :meth:`write` would make it, in one round trip where the
        client allows (worker/lean_script.py's ``call_many``); each answer, or the error of a
        script that failed (a connection error is raised: none, some or all of them ran)."""
        calls = [
            self.transition_call(w.account, w.reference_id, w.target, **w.options) for w in writes
        ]
        return [
            answer if isinstance(answer, Exception) else read_transition(answer)
            for answer in call_many(self._transition, calls)
        ]

    def transition_call(
        self,
        account: str,
        reference_id: str,
        target: State,
        *,
        sources: Iterable[State] | None = None,
        next_step: str = "",
        delay: float = 0.0,
        fields: Mapping[str, str | int | float] | None = None,
        increments: Mapping[str, int] | None = None,
        guard: tuple[str, str] | None = None,
        operator: bool = False,
        not_before: float | None = None,
        holds_slot: bool = False,
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of :meth:`transition`'s script for these arguments."""
        allowed = (
            list(sources) if sources is not None else sorted(sources_of(target, operator=operator))
        )
        if next_step not in ("", *STEPS):
            raise ValueError(f"next_step must be '', 'create' or 'track', not {next_step!r}")
        k = self.keys
        keys = [
            k.payment(account, reference_id),
            k.inflight(account, "create"),
            k.inflight(account, "track"),
            k.due(account, "create"),
            k.due(account, "track"),
            k.events_written(account),
            k.by_state(account, target),
            k.pending_age(account),
            k.not_before(account),
            k.held(account),
            k.held(account, "create"),
            *(k.by_state(account, s) for s in allowed),
        ]
        args: list[Any] = [
            reference_id,
            target.value,
            ",".join(s.value for s in allowed),
            next_step,
            f"{max(delay, 0.0):.6f}",
            self.events_maxlen,
            guard[0] if guard else "",
            guard[1] if guard else "",
            1 if target in FINAL else 0,
            len(increments or {}),
            _not_before_arg(next_step, not_before, holds_slot),
        ]
        for name, amount in (increments or {}).items():
            args += [name, amount]
        for name, value in (fields or {}).items():
            args += [name, value]
        return keys, args

    def release(self, account: str, reference_id: str) -> None:
        """Forget a dispatched step that found nothing to do (its payment is already final)."""
        pipe = self.redis.pipeline(transaction=True)
        for step in STEPS:
            pipe.zrem(self.keys.inflight(account, step), reference_id)
        pipe.execute()

    def put_back(self, account: str, step: str, references: Sequence[str], *, owner: str) -> int:
        """Put the in-flight ``step`` of each of ``references`` back as due now, where
        ``owner`` still owns it (claimed, never started); the number put back."""
        if not references:
            return 0
        k = self.keys
        return int(
            self._put_back(
                keys=[k.inflight(account, step), k.due(account, step), k.owners(account)],
                args=[step, owner, *references],
            )
        )

    def claim_due(
        self,
        account: str,
        *,
        budget: int,
        lease: float,
        batch: int,
        pace: TrackPace | None = None,
    ) -> Claim:
        """Claim up to ``batch`` due steps of ``account`` while fewer than ``budget`` are in
        flight (creates first), leasing each for ``lease`` seconds; recover expired leases.

        ``pace`` caps the tracks claimed (the poll planner's quota for this pass); tracks then
        have their own in-flight budget, so a create backlog cannot starve them. Without it,
        tracks take what the creates leave of the in-flight budget. With a pace, a track whose
        not-before passed more than ``pace.starve_after`` seconds ago goes first, whatever its
        due time, and (with ``pace.pull``) spare pace pulls the soonest tracks forward, past
        their not-before only.
        """
        paces = None if pace is None else {account: pace}
        return self.claim_due_many({account: budget}, lease=lease, batch=batch, paces=paces)[
            account
        ]

    def claim_due_many(
        self,
        budgets: Mapping[str, int],
        *,
        lease: float,
        batch: int,
        paces: Mapping[str, TrackPace] | None = None,
        dead: Iterable[str] = (),
        claimer: str = "",
    ) -> dict[str, Claim]:
        """:meth:`claim_due` for several accounts (account -> budget, and account -> pace when
        the planner paces polls) in one round trip. Steps owned by a process in ``dead``
        (stopped heartbeating) go back to due first. ``claimer``: the worker process that
        claims (and runs the tracks it can itself, worker/local_steps.py) owns the claimed
        tracks from the claim on, until a worker's ``start_step`` takes them; creates, and
        every step with "", are unowned until started."""
        dead_arg = ",".join(dead)
        k = self.keys
        calls = ScriptBatch(self.redis)
        for account, budget in budgets.items():
            pace = UNPACED if paces is None else paces.get(account, TrackPace(0))
            calls.add(
                self._claim,
                [
                    k.inflight(account, "create"),
                    k.inflight(account, "track"),
                    k.due(account, "create"),
                    k.due(account, "track"),
                    k.not_before(account),
                    k.held(account),
                    k.owners(account),
                    k.held(account, "create"),
                    k.event_outbox(account),
                ],
                [
                    budget,
                    lease,
                    batch,
                    pace.polls,
                    _seconds(pace.starve_after),
                    1 if pace.pull else 0,
                    pace.creates,
                    dead_arg,
                    claimer,
                ],
            )
        claims = {}
        for account, reply in zip(budgets, calls.execute(), strict=True):
            claims[account] = Claim(
                now=float(reply[0]),
                recovered=int(reply[1]),
                most_overdue=float(reply[2]),
                creates=[_text(r) for r in reply[3]],
                tracks=[_text(r) for r in reply[4]],
                creates_due=int(reply[5]),
                tracks_due=int(reply[6]),
                held_tracks=int(reply[7]),
                held_creates=int(reply[8]),
                outbox=int(reply[9]),
            )
        return claims

    def start_step(
        self, account: str, step: str, reference_id: str, *, owner: str, lease: float
    ) -> PaymentRecord | None:
        """A worker process ``owner`` starts the in-flight ``step`` of a payment and reads its
        record, in one round trip: it owns the step (the sweeper re-dispatches it once
        ``owner`` stops heartbeating) and its lease runs from now, unless the step was not in
        flight (put back, or done already). The record (None when there is none), read after
        the ownership was taken: the step's first read, as :meth:`get` would give it."""
        k = self.keys
        _owned, flat = self._start_step(
            keys=[k.inflight(account, step), k.owners(account), k.payment(account, reference_id)],
            args=[reference_id, step, owner, lease],
        )
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return PaymentRecord.from_hash(raw) if raw else None

    # --- readers --------------------------------------------------------------------------------
    def get(self, account: str, reference_id: str) -> PaymentRecord | None:
        """The record of (account, reference_id), or None."""
        raw = self.redis.hgetall(self.keys.payment(account, reference_id))
        return PaymentRecord.from_hash(raw) if raw else None

    def accounts(self) -> list[str]:
        """Every account that has had a payment, sorted."""
        return sorted(_text(a) for a in self.redis.smembers(self.keys.accounts()))

    def find(self, reference_id: str, account: str | None = None) -> list[PaymentRecord]:
        """Records with this reference_id, in ``account`` or in every account."""
        accounts = [account] if account else self.accounts()
        pipe = self.redis.pipeline(transaction=False)
        for name in accounts:
            pipe.hgetall(self.keys.payment(name, reference_id))
        return [PaymentRecord.from_hash(raw) for raw in pipe.execute() if raw]

    def iter_records(
        self, *, account: str | None = None, state: str | None = None, chunk: int = 500
    ) -> Iterator[PaymentRecord]:
        """Every record, optionally of one account and/or one state, sorted by reference_id
        within each account."""
        states = [state] if state else [s.value for s in ALL_STATES]
        for name in [account] if account else self.accounts():
            refs: set[str] = set()
            for s in states:
                refs.update(_text(r) for r in self.redis.smembers(self.keys.by_state(name, s)))
            ordered = sorted(refs)
            for start in range(0, len(ordered), chunk):
                pipe = self.redis.pipeline(transaction=False)
                for ref in ordered[start : start + chunk]:
                    pipe.hgetall(self.keys.payment(name, ref))
                for raw in pipe.execute():
                    if raw:
                        yield PaymentRecord.from_hash(raw)

    def count_by_state(self, account: str | None = None) -> dict[str, int]:
        """Number of payments in each state (of one account, or all)."""
        accounts = [account] if account else self.accounts()
        pipe = self.redis.pipeline(transaction=False)
        for name in accounts:
            for s in ALL_STATES:
                pipe.scard(self.keys.by_state(name, s))
        counts = dict.fromkeys((s.value for s in ALL_STATES), 0)
        replies = iter(pipe.execute())
        for _ in accounts:
            for s in ALL_STATES:
                counts[s.value] += int(next(replies))
        return counts

    def now(self) -> float:
        """The Redis clock, in epoch seconds: the one clock of schedules and the limiter."""
        seconds, micros = self.redis.time()
        return float(seconds) + micros / 1e6
