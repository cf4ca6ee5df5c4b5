"""The track step: poll a payment until a terminal status, each next poll placed by the poll
policy (worker/polling/timer.py), within the tracking deadline; unknown statuses are counted and
polled again, 404 and the deadline end in visible states. A poll that sees the payment final
teaches the key's completion model when it completed (between the last pending poll and now)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import structlog

from worker import metrics
from worker.errors import ApiError, NotFound, SlotMissed, SlotTooFar
from worker.runtime import Runtime
from worker.schedule import retry_delay
from worker.steps.outcomes import (
    begin_step,
    describe,
    hold_fields,
    log,
    persist,
    record_move,
    reschedule_write,
)
from worker.store import PaymentRecord, State, Transition, TransitionWrite
from worker.store.states import API_TERMINAL, from_api_status
from worker.store.store import NOW

KNOWN_STATUSES = frozenset({"pending"} | {s.value for s in API_TERMINAL})


@dataclass(frozen=True)
class Poll:
    """A poll ready to send: the record as its step started, and the slot its GET is to use
    (``hold``, Redis clock; None: the GET books its own)."""

    rec: PaymentRecord
    hold: float | None
    created_at: float
    deadline: float


def run_track(rt: Runtime, account: str, reference_id: str) -> str:
    """Poll the payment of (account, reference_id) once and schedule the next poll or finish."""
    poll = start_poll(rt, account, reference_id)
    return poll if isinstance(poll, str) else send_poll(rt, poll)


def start_poll(rt: Runtime, account: str, reference_id: str) -> Poll | str:
    """A poll's first half: own the step, read the record, book the GET's slot. The poll to
    send (:func:`send_poll`, at its slot), or the outcome when there is nothing to send (the
    payment is not pending, or its tracking deadline passed). Binds the payment's log
    context."""
    structlog.contextvars.unbind_contextvars("payment_id")
    structlog.contextvars.bind_contextvars(account=account, reference_id=reference_id)
    rec, hold = _start_poll(rt, account, reference_id)
    return begin_poll(rt, account, reference_id, rec, hold)


def begin_poll(
    rt: Runtime, account: str, reference_id: str, rec: PaymentRecord | None, hold: float | None
) -> Poll | str:
    """The poll of a track step started with record ``rec`` and slot ``hold`` (None: the GET
    books its own), or the outcome when there is nothing to send. Binds ``payment_id`` to the
    log context (the caller binds the account and the reference)."""
    if rec is None or rec.state != State.PENDING:
        rt.store.release(account, reference_id)
        return "nothing_to_do"
    structlog.contextvars.bind_contextvars(payment_id=rec.payment_id)
    created_at = rec.created_at or rec.submitted_at or time.time()
    deadline = rt.schedule.deadline(created_at)
    if time.time() >= deadline:
        return _end_track(
            rt,
            rec,
            State.TRACKING_TIMEOUT,
            f"not terminal {rt.settings.tracking_timeout:g}s after create",
        )
    return Poll(rec, hold, created_at, deadline)


def slot_for(rec: PaymentRecord | None, booked: float | None) -> float | None:
    """The slot a poll's GET uses: the one an earlier run held for it, else ``booked``."""
    if rec is not None and rec.slot_hold is not None:
        return rec.slot_hold
    return booked


@dataclass(frozen=True)
class Outcome:
    """What a poll's answer leaves: the transition to write, the job's outcome label, and
    what follows once the write is made (metrics, logs, learning), given its answer."""

    label: str
    write: TransitionWrite
    after: Callable[[Transition], None] | None = None


def send_poll(rt: Runtime, poll: Poll) -> str:
    """A poll's second half: the GET (waiting for its slot), then its outcome stored and the
    next poll scheduled; the outcome's label. Expects the log context :func:`start_poll`
    bound."""
    return write_outcome(rt, answer_poll(rt, poll))


def write_outcome(rt: Runtime, outcome: Outcome) -> str:
    """Write ``outcome`` now (retrying while Redis is away), run what follows it; its label."""
    moved = persist(lambda: rt.store.write(outcome.write))
    if outcome.after is not None:
        outcome.after(moved)
    return outcome.label


def answer_poll(rt: Runtime, poll: Poll) -> Outcome:
    """The GET of ``poll`` (waiting for its slot) and the outcome it leaves, not written yet
    (:func:`send_poll` writes it at once; worker/local_steps.py batches the writes)."""
    rec, hold, created_at, deadline = poll.rec, poll.hold, poll.created_at, poll.deadline
    account = rec.account
    try:
        payment = rt.client.get_payment(
            account, rec.payment_id, max_wait=rt.settings.max_wait, hold=hold
        )
    except SlotTooFar as exc:
        return Outcome(
            "far_slot",
            reschedule_write(rt, rec, State.PENDING, "track", exc.retry_in, hold=exc.hold),
        )
    except SlotMissed:
        # Ready to send too late for the slot, or the slot behind a late write of this process
        # (RateLimiter.behind_late_write): nothing was sent. A slow host is not the API
        # failing: a fresh slot at once, no error counted (as the create step does).
        return Outcome("slot_missed", reschedule_write(rt, rec, State.PENDING, "track", 0.0))
    except NotFound as exc:
        return _ending(rt, rec, State.FAILED, describe(exc))
    except ApiError as exc:
        # A GET changes nothing: every failure is retried, with backoff, until the deadline.
        # Consecutive failures so far, read with the record: the reschedule below counts this
        # one in the same write (no extra round trip).
        errors = rec.errors + 1
        delay = retry_delay(
            errors,
            rt.rng,
            base=rt.settings.retry_base_delay,
            cap=rt.settings.poll_max_delay,
            retry_after=exc.retry_after,
        )
        return Outcome(
            "retry",
            reschedule_write(
                rt,
                rec,
                State.PENDING,
                "track",
                min(delay, max(deadline - time.time(), 0)),
                fields={"last_error": describe(exc)},
                increments={"errors": 1},
            ),
        )

    status = payment.status
    terminal = from_api_status(status)
    if terminal is not None:

        def after_final(moved: Transition) -> None:
            record_move(rt, rec, terminal, moved)
            if moved.moved:
                _learn(rt, rec, created_at, moved)

        return Outcome(
            terminal.value,
            TransitionWrite(
                account,
                rec.reference_id,
                terminal,
                {
                    "sources": [State.PENDING],
                    "next_step": "",
                    "fields": _answered(status),
                    "increments": {"polls": 1},
                },
            ),
            after_final,
        )
    if status.lower() not in KNOWN_STATUSES:
        # api-contract.md: new statuses can appear without a version bump. Keep polling.
        metrics.record_unknown_status(account)
        log.warning("payment.unknown_status", status=status[:64])
    delay = rt.timer.after_poll(account, age=time.time() - created_at, polls=rec.polls + 1)
    delay = min(delay, max(deadline - time.time(), 0.0))
    return Outcome(
        "polled",
        TransitionWrite(
            account,
            rec.reference_id,
            State.PENDING,
            {
                "sources": [State.PENDING],
                "next_step": "track",
                "delay": delay,
                "not_before": rt.timer.pull_after(),
                "fields": {**_answered(status), **hold_fields(rec)},
                "increments": {"polls": 1},
            },
        ),
    )


def _answered(status: str) -> dict[str, str | int | float]:
    """The record fields every answered poll writes: the status seen, errors cleared."""
    return {"api_status": status, "errors": 0, "last_error": "", "polled_at": NOW}


def _start_poll(
    rt: Runtime, account: str, reference_id: str
) -> tuple[PaymentRecord | None, float | None]:
    """The record as the step starts and the slot its GET is to use: in a worker process, one
    round trip owns the step, reads the record and books the key's next slot for the GET
    (``PollStarter``); the slot an earlier run held (``slot_hold``) is taken up instead of a
    new one. Elsewhere (no identity, or an account this process has no settings for, which
    the GET then reports), the record only; the GET books its own slot."""
    configured = rt.settings.accounts.get(account)
    if not rt.identity or configured is None:
        rec = begin_step(rt, "track", account, reference_id)
        return rec, slot_for(rec, None)
    started = rt.polls.start(
        account,
        reference_id,
        owner=rt.identity,
        lease=rt.settings.sweep_grace,
        rate=configured.rate,
        max_wait=rt.settings.max_wait,
    )
    return started.record, slot_for(started.record, started.slot)


def _learn(rt: Runtime, rec: PaymentRecord, created_at: float, moved: Transition) -> None:
    """The payment completed after its last pending poll (or its create) and before now: count
    that bound on the detection delay, and teach the key's completion model the interval."""
    last_pending = rec.polled_at or created_at
    metrics.record_detection_bound(rec.account, max(0.0, moved.now - last_pending))
    try:
        rt.plans.observe(rec.account, last_pending - created_at, moved.now - created_at)
    except redis.RedisError as exc:
        # Learning is best effort: the outcome itself is stored already.
        log.warning("planner.observe_failed", error=str(exc))


def _ending(rt: Runtime, rec: PaymentRecord, target: State, error: str) -> Outcome:
    """The outcome that ends tracking in ``target`` (404, the deadline) with ``error``."""

    def after(moved: Transition) -> None:
        record_move(rt, rec, target, moved)
        log.warning("track.ended", state=target.value, error=error)

    write = TransitionWrite(
        rec.account,
        rec.reference_id,
        target,
        {"sources": [State.PENDING], "next_step": "", "fields": {"last_error": error}},
    )
    return Outcome(target.value, write, after)


def _end_track(rt: Runtime, rec: PaymentRecord, target: State, error: str) -> str:
    return write_outcome(rt, _ending(rt, rec, target, error))
