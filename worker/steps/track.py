"""The track step: poll a payment until a terminal status, by the PollSchedule, within the
tracking deadline; unknown statuses are counted and polled again, 404 and the deadline end in
visible states."""

from __future__ import annotations

import time

import structlog

from worker import metrics
from worker.errors import ApiError, NotFound, SlotTooFar
from worker.runtime import Runtime
from worker.schedule import retry_delay
from worker.steps.outcomes import (
    describe,
    hold_fields,
    log,
    persist,
    record_move,
    reschedule,
)
from worker.store import PaymentRecord, State
from worker.store.states import API_TERMINAL, from_api_status

KNOWN_STATUSES = frozenset({"pending"} | {s.value for s in API_TERMINAL})


def run_track(rt: Runtime, account: str, reference_id: str) -> str:
    """Poll the payment of (account, reference_id) once and schedule the next poll or finish."""
    structlog.contextvars.unbind_contextvars("payment_id")
    structlog.contextvars.bind_contextvars(account=account, reference_id=reference_id)
    rec = rt.store.get(account, reference_id)
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
    try:
        payment = rt.client.get_payment(
            account, rec.payment_id, max_wait=rt.settings.max_wait, hold=rec.slot_hold
        )
    except SlotTooFar as exc:
        reschedule(rt, rec, State.PENDING, "track", exc.retry_in, hold=exc.hold)
        return "far_slot"
    except NotFound as exc:
        return _end_track(rt, rec, State.FAILED, describe(exc))
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
        reschedule(
            rt,
            rec,
            State.PENDING,
            "track",
            min(delay, max(deadline - time.time(), 0)),
            fields={"last_error": describe(exc)},
            increments={"errors": 1},
        )
        return "retry"

    status = payment.status
    terminal = from_api_status(status)
    if terminal is not None:
        moved = persist(
            lambda: rt.store.transition(
                account,
                reference_id,
                terminal,
                sources=[State.PENDING],
                next_step="",
                fields={"api_status": status, "errors": 0, "last_error": ""},
                increments={"polls": 1},
            )
        )
        record_move(rt, rec, terminal, moved)
        return terminal.value
    if status.lower() not in KNOWN_STATUSES:
        # api-contract.md: new statuses can appear without a version bump. Keep polling.
        metrics.record_unknown_status(account)
        log.warning("payment.unknown_status", status=status[:64])
    delay = rt.schedule.delay(rec.polls + 1, rt.rng)
    delay = min(delay, max(deadline - time.time(), 0.0))
    persist(
        lambda: rt.store.transition(
            account,
            reference_id,
            State.PENDING,
            sources=[State.PENDING],
            next_step="track",
            delay=delay,
            fields={"api_status": status, "errors": 0, "last_error": "", **hold_fields(rec)},
            increments={"polls": 1},
        )
    )
    return "polled"


def _end_track(rt: Runtime, rec: PaymentRecord, target: State, error: str) -> str:
    moved = persist(
        lambda: rt.store.transition(
            rec.account,
            rec.reference_id,
            target,
            sources=[State.PENDING],
            next_step="",
            fields={"last_error": error},
        )
    )
    record_move(rt, rec, target, moved)
    log.warning("track.ended", state=target.value, error=error)
    return target.value
