"""What the create and track steps share: durable writes, error text, transition side effects
and rescheduling."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis
import structlog

from worker import metrics
from worker.errors import ApiError
from worker.runtime import Runtime
from worker.store import PaymentRecord, State, Transition, TransitionWrite
from worker.store.states import API_TERMINAL

log = structlog.get_logger("paypoll.steps")

T = TypeVar("T")

REDIS_RETRY_FOR = 20.0  # seconds a step keeps retrying its final write while Redis is away


def persist(write: Callable[[], T]) -> T:
    """Run a store write, retrying while Redis is unreachable (a restart), up to a bound.

    The outcome of an API call must not be dropped because Redis blinked: a created payment
    whose id is lost would later be judged ``create_unknown``.
    """
    deadline = time.monotonic() + REDIS_RETRY_FOR
    delay = 0.1
    while True:
        try:
            return write()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def begin_step(rt: Runtime, step: str, account: str, reference_id: str) -> PaymentRecord | None:
    """The payment's record as a dispatched ``step`` starts, and, in a worker process (one
    with an identity), ownership of the step in the same round trip: if this process dies,
    the sweeper dispatches the step again within PAYPOLL_DEAD_AFTER instead of waiting out
    the lease. None when there is no record."""
    if not rt.identity:
        return rt.store.get(account, reference_id)
    return rt.store.start_step(
        account, step, reference_id, owner=rt.identity, lease=rt.settings.sweep_grace
    )


def describe(exc: ApiError) -> str:
    """The error as stored in ``last_error`` and shown to operators (never a secret)."""
    text = f"{type(exc).__name__}: {exc}"
    validation = getattr(exc, "validation_errors", None)
    if validation:
        text += " " + "; ".join(f"{k}: {v}" for k, v in sorted(validation.items()))
    return text[:1000]


def record_move(rt: Runtime, rec: PaymentRecord, target: State, moved: Transition) -> None:
    """Metrics and log of a transition that happened (callbacks and webhooks read the events
    stream the transition was written to: worker/outbox.py)."""
    if not moved.moved or moved.previous == target.value:
        return
    metrics.record_transition(rec.account, target.value)
    log.info("payment.transition", state_from=moved.previous, state_to=target.value)
    if target in API_TERMINAL or target in (
        State.REJECTED,
        State.CREATE_UNKNOWN,
        State.TRACKING_TIMEOUT,
        State.FAILED,
    ):
        since = moved.now - moved.submitted_at if moved.submitted_at else 0.0
        metrics.record_terminal(rec.account, target.value, since, moved.polls)


def hold_fields(rec: PaymentRecord, hold: float | None = None) -> dict[str, str]:
    """The record fields that keep ``hold`` for the next run of its step, or drop the hold the
    record had (a hold serves the run right after its reschedule only); nothing otherwise, so
    that a payment that never held a slot carries no such field."""
    if hold is not None:
        return {"slot_hold": repr(hold)}
    return {"slot_hold": ""} if rec.slot_hold is not None else {}


def reschedule_write(
    rt: Runtime,
    rec: PaymentRecord,
    state: State,
    step: str,
    delay: float,
    *,
    guard: tuple[str, str] | None = None,
    fields: dict[str, str | int | float] | None = None,
    increments: dict[str, int] | None = None,
    hold: float | None = None,
) -> TransitionWrite:
    """The transition that keeps the payment in ``state`` and makes its next ``step`` due
    ``delay`` seconds from now (what :func:`reschedule` writes).

    ``hold`` is the rate-limit slot held for that step (``SlotTooFar.hold``); any hold the
    record had is dropped otherwise (a hold is for the run right after the reschedule).
    """
    return TransitionWrite(
        rec.account,
        rec.reference_id,
        state,
        {
            "sources": [state],
            "next_step": step,
            "delay": delay,
            "guard": guard,
            "fields": {**(fields or {}), **hold_fields(rec, hold)},
            "increments": increments,
            # A retry is never pulled forward: not before its delay. A step that holds a slot
            # is claimed at its time outside the poll pace and the in-flight budget: its call
            # is booked already, and a hold claimed late is wasted.
            "not_before": rt.timer.pull_after(delay),
            "holds_slot": hold is not None,
        },
    )


def reschedule(
    rt: Runtime,
    rec: PaymentRecord,
    state: State,
    step: str,
    delay: float,
    *,
    guard: tuple[str, str] | None = None,
    fields: dict[str, str | int | float] | None = None,
    increments: dict[str, int] | None = None,
    hold: float | None = None,
) -> Transition:
    """Keep the payment in ``state`` and make its next ``step`` due ``delay`` seconds from now
    (:func:`reschedule_write`, written now)."""
    write = reschedule_write(
        rt, rec, state, step, delay, guard=guard, fields=fields, increments=increments, hold=hold
    )
    return persist(lambda: rt.store.write(write))
