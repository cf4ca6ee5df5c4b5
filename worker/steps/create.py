"""The create step: post a payment request at most once per (account, reference_id).

Before the request goes on the wire the record is marked ``phase=sent`` by a compare-and-set
(invariant 3), so a second delivery of the same message can neither post again nor mistake an
in-flight create for a lost one. Safe failures are retried with backoff; an answer that was lost
makes the payment ``create_unknown``; 400/422 make it ``rejected``.
"""

from __future__ import annotations

import time

import structlog

from worker import metrics
from worker.api.models import PaymentRequest
from worker.errors import (
    Ambiguous,
    ApiError,
    CredentialsRefused,
    MalformedResponse,
    RejectedInput,
    SlotMissed,
    SlotTooFar,
)
from worker.runtime import Runtime
from worker.schedule import retry_delay
from worker.steps.outcomes import (
    begin_step,
    describe,
    hold_fields,
    log,
    persist,
    record_move,
    reschedule,
)
from worker.store import PaymentRecord, State
from worker.store.store import NOW

SENT_GRACE = 5.0  # seconds beyond connect+read timeout before an in-flight create counts as lost


def run_create(rt: Runtime, account: str, reference_id: str) -> str:
    """Create the payment request of (account, reference_id) on the API, at most once.

    Returns what happened, for the job's log and metrics.
    """
    structlog.contextvars.unbind_contextvars("payment_id")
    structlog.contextvars.bind_contextvars(account=account, reference_id=reference_id)
    rec = begin_step(rt, "create", account, reference_id)
    if rec is None or rec.state not in (State.QUEUED, State.CREATING):
        rt.store.release(account, reference_id)
        return "nothing_to_do"
    if rec.phase == "sent":
        return _settle_interrupted_create(rt, rec)

    state = State(rec.state)
    settings = rt.settings
    marked = False

    def mark_sent() -> None:
        # The compare-and-set that makes a create at-most-once across redeliveries. The client
        # calls this again when it retries after a 401 (the API refused the first request, so
        # nothing was made): this step already holds the mark then.
        nonlocal marked
        if marked:
            return
        moved = rt.store.transition(
            account,
            reference_id,
            State.CREATING,
            sources=[State.QUEUED, State.CREATING],
            next_step="create",
            delay=settings.connect_timeout + settings.read_timeout + SENT_GRACE,
            guard=("phase", ""),
            fields={"phase": "sent", "sent_at": NOW, **hold_fields(rec)},
            increments={"attempts": 1},
        )
        if not moved.moved:
            raise _LostRace(moved.previous)
        marked = True
        record_move(rt, rec, State.CREATING, moved)
        wanted = settings.wait_replicas()
        if wanted:
            # Under Sentinel: the mark must reach a replica before the POST, or a failover
            # right after it could lose the mark and let a re-run post the payment again.
            began = time.monotonic()
            acked = int(rt.redis.wait(wanted, int(settings.redis_wait_timeout * 1000)))
            metrics.record_replica_wait(time.monotonic() - began, acked=acked >= wanted)
            if acked < wanted:
                raise _ReplicaLag(f"the sent-mark reached {acked} of {wanted} replica(s)")

    try:
        payment = rt.client.create_payment(
            account,
            amount=rec.amount,
            currency=rec.currency,
            redirect_url=rec.redirect_url,
            reference_id=reference_id,
            max_wait=settings.max_wait,
            hold=rec.slot_hold,
            before_send=mark_sent,
        )
    except _LostRace:
        return "duplicate_delivery"
    except SlotTooFar as exc:
        reschedule(rt, rec, state, "create", exc.retry_in, guard=("phase", ""), hold=exc.hold)
        return "far_slot"
    except _ReplicaLag as exc:
        # Marked, but not safe on a replica yet: nothing was sent. Undo the mark (on the
        # master we still talk to) and try again after a backoff.
        log.warning("create.replica_lag", error=str(exc))
        reschedule(
            rt,
            rec,
            State.CREATING,
            "create",
            settings.retry_base_delay,
            guard=("phase", "sent"),
            fields={"phase": "", "last_error": str(exc)},
            increments={"attempts": -1},
        )
        return "replica_lag"
    except SlotMissed as exc:
        # Marked, then too late for the slot: nothing was sent. Undo the mark and the attempt
        # it counted, and come back at once for a fresh slot (a slow host is not the API
        # failing: it must not use up the create's attempts).
        reschedule(
            rt,
            rec,
            State.CREATING if marked else state,
            "create",
            0.0,
            guard=("phase", "sent") if marked else ("phase", ""),
            fields={"phase": "", "last_error": describe(exc)},
            increments={"attempts": -1} if marked else None,
        )
        return "slot_missed"
    except RejectedInput as exc:
        return _end_create(rt, rec, State.REJECTED, describe(exc), marked)
    except (Ambiguous, MalformedResponse) as exc:
        if marked and not settings.retry_ambiguous_create:
            return _end_create(rt, rec, State.CREATE_UNKNOWN, describe(exc), marked)
        return _retry_create(rt, rec, exc, marked)
    except CredentialsRefused as exc:
        # The account's credentials are wrong: nothing else of this account can work until an
        # operator fixes them. Keep the payment (nothing lost) and look again much later.
        log.error("account.credentials_refused", error=str(exc))
        guard = ("phase", "sent") if marked else ("phase", "")
        target = State.CREATING if marked else state
        reschedule(
            rt,
            rec,
            target,
            "create",
            settings.retry_max_delay,
            guard=guard,
            fields={"phase": "", "last_error": describe(exc)},
        )
        return "credentials_refused"
    except ApiError as exc:
        if exc.retry_safe or not marked:
            return _retry_create(rt, rec, exc, marked)
        return _end_create(rt, rec, State.FAILED, describe(exc), marked)
    return _created(rt, rec, payment)


class _LostRace(Exception):
    """Another delivery of the same create message marked the payment first."""


class _ReplicaLag(Exception):
    """The create's sent-mark was not acknowledged by enough replicas in time (WAIT)."""


def _created(rt: Runtime, rec: PaymentRecord, payment: PaymentRequest) -> str:
    structlog.contextvars.bind_contextvars(payment_id=payment.id)
    moved = persist(
        lambda: rt.store.transition(
            rec.account,
            rec.reference_id,
            State.PENDING,
            sources=[State.CREATING],
            next_step="track",
            delay=rt.timer.after_create(rec.account),
            not_before=rt.timer.pull_after(),
            guard=("phase", "sent"),
            fields={
                "phase": "",
                "payment_id": payment.id,
                "url": payment.url or "",
                "api_status": payment.status,
                "created_at": NOW,
                "last_error": "",
            },
        )
    )
    record_move(rt, rec, State.PENDING, moved)
    if not moved.moved:
        # Only an operator can have moved it meanwhile; the payment exists, so say so loudly.
        log.error("create.outcome_not_recorded", payment_id=payment.id, state=moved.previous)
        return "created_not_recorded"
    return "created"


def _end_create(rt: Runtime, rec: PaymentRecord, target: State, error: str, marked: bool) -> str:
    moved = persist(
        lambda: rt.store.transition(
            rec.account,
            rec.reference_id,
            target,
            sources=[State.CREATING] if marked else [State.QUEUED, State.CREATING],
            next_step="",
            guard=("phase", "sent") if marked else ("phase", ""),
            fields={
                "phase": "" if target != State.CREATE_UNKNOWN else "unknown",
                "last_error": error,
            },
        )
    )
    record_move(rt, rec, target, moved)
    log.warning("create.ended", state=target.value, error=error)
    return target.value


def _retry_create(rt: Runtime, rec: PaymentRecord, exc: ApiError, marked: bool) -> str:
    attempts = rec.attempts + (1 if marked else 0)
    if attempts >= rt.settings.create_max_attempts:
        return _end_create(
            rt, rec, State.FAILED, f"{attempts} attempts; last: {describe(exc)}", marked
        )
    delay = retry_delay(
        max(attempts, 1),
        rt.rng,
        base=rt.settings.retry_base_delay,
        cap=rt.settings.retry_max_delay,
        retry_after=exc.retry_after,
    )
    target = State.CREATING if marked else State(rec.state)
    reschedule(
        rt,
        rec,
        target,
        "create",
        delay,
        guard=("phase", "sent") if marked else ("phase", ""),
        fields={"phase": "", "last_error": describe(exc)},
    )
    log.info("create.retry", error=type(exc).__name__, delay=round(delay, 3), attempts=attempts)
    return "retry"


def _settle_interrupted_create(rt: Runtime, rec: PaymentRecord) -> str:
    """A create marked sent whose outcome was never recorded: in flight elsewhere, or lost."""
    assert rec.sent_at is not None
    settings = rt.settings
    give_up_at = rec.sent_at + settings.connect_timeout + settings.read_timeout + SENT_GRACE
    now = rt.store.now()
    if now < give_up_at:
        # Another delivery may still be waiting for the answer: look again after its timeout.
        reschedule(rt, rec, State.CREATING, "create", give_up_at - now, guard=("phase", "sent"))
        return "in_flight_elsewhere"
    if settings.retry_ambiguous_create:
        reschedule(
            rt,
            rec,
            State.CREATING,
            "create",
            0.0,
            guard=("phase", "sent"),
            fields={"phase": "", "last_error": "create interrupted; re-posting"},
        )
        return "retry"
    return _end_create(
        rt,
        rec,
        State.CREATE_UNKNOWN,
        "the worker stopped while the create request was in flight; it may exist on the API",
        marked=True,
    )
