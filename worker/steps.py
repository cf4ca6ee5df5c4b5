"""The two steps of a payment's life, as plain functions of a Runtime: create and track.

The dramatiq actors (worker/actors.py) only call these. Every outcome ends in exactly one store
transition, which also schedules the payment's next step (or none), so a step never leaves a
payment without a next time (invariant 4). Errors are decided here, not retried by dramatiq:
- create (invariant 3): posted at most once per (account, reference_id). Before the request goes
  on the wire the record is marked ``phase=sent`` by a compare-and-set, so a second delivery of
  the same message can neither post again nor mistake an in-flight create for a lost one.
- track: polls until a terminal status, by the PollSchedule, within the tracking deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis
import structlog

from worker import metrics
from worker.api.models import PaymentRequest
from worker.errors import (
    Ambiguous,
    ApiError,
    CredentialsRefused,
    MalformedResponse,
    NotFound,
    RejectedInput,
    SlotTooFar,
)
from worker.runtime import Runtime
from worker.schedule import retry_delay
from worker.store import PaymentRecord, State, Transition
from worker.store.states import API_TERMINAL, from_api_status
from worker.store.store import NOW

log = structlog.get_logger("paypoll.steps")

T = TypeVar("T")

SENT_GRACE = 5.0  # seconds beyond connect+read timeout before an in-flight create counts as lost
REDIS_RETRY_FOR = 20.0  # seconds a step keeps retrying its final write while Redis is away
KNOWN_STATUSES = frozenset({"pending"} | {s.value for s in API_TERMINAL})


def _persist(write: Callable[[], T]) -> T:
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


def _describe(exc: ApiError) -> str:
    """The error as stored in ``last_error`` and shown to operators (never a secret)."""
    text = f"{type(exc).__name__}: {exc}"
    validation = getattr(exc, "validation_errors", None)
    if validation:
        text += " " + "; ".join(f"{k}: {v}" for k, v in sorted(validation.items()))
    return text[:1000]


def _record_move(rt: Runtime, rec: PaymentRecord, target: State, moved: Transition) -> None:
    """Metrics, log and callback for a transition that happened."""
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
        if rt.on_final is not None:
            rt.on_final(rec.account, rec.reference_id, target.value)


# --- create -----------------------------------------------------------------------------------


def run_create(rt: Runtime, account: str, reference_id: str) -> str:
    """Create the payment request of (account, reference_id) on the API, at most once.

    Returns what happened, for the job's log and metrics.
    """
    structlog.contextvars.unbind_contextvars("payment_id")
    structlog.contextvars.bind_contextvars(account=account, reference_id=reference_id)
    rec = rt.store.get(account, reference_id)
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
            fields={"phase": "sent", "sent_at": NOW},
            increments={"attempts": 1},
        )
        if not moved.moved:
            raise _LostRace(moved.previous)
        marked = True
        _record_move(rt, rec, State.CREATING, moved)

    try:
        payment = rt.client.create_payment(
            account,
            amount=rec.amount,
            currency=rec.currency,
            redirect_url=rec.redirect_url,
            reference_id=reference_id,
            max_wait=settings.max_wait,
            before_send=mark_sent,
        )
    except _LostRace:
        return "duplicate_delivery"
    except SlotTooFar as exc:
        _reschedule(rt, rec, state, "create", exc.retry_in, guard=("phase", ""))
        return "far_slot"
    except RejectedInput as exc:
        return _end_create(rt, rec, State.REJECTED, _describe(exc), marked)
    except (Ambiguous, MalformedResponse) as exc:
        if marked and not settings.retry_ambiguous_create:
            return _end_create(rt, rec, State.CREATE_UNKNOWN, _describe(exc), marked)
        return _retry_create(rt, rec, exc, marked)
    except CredentialsRefused as exc:
        # The account's credentials are wrong: nothing else of this account can work until an
        # operator fixes them. Keep the payment (nothing lost) and look again much later.
        log.error("account.credentials_refused", error=str(exc))
        guard = ("phase", "sent") if marked else ("phase", "")
        target = State.CREATING if marked else state
        _reschedule(
            rt,
            rec,
            target,
            "create",
            settings.retry_max_delay,
            guard=guard,
            fields={"phase": "", "last_error": _describe(exc)},
        )
        return "credentials_refused"
    except ApiError as exc:
        if exc.retry_safe or not marked:
            return _retry_create(rt, rec, exc, marked)
        return _end_create(rt, rec, State.FAILED, _describe(exc), marked)
    return _created(rt, rec, payment)


class _LostRace(Exception):
    """Another delivery of the same create message marked the payment first."""


def _created(rt: Runtime, rec: PaymentRecord, payment: PaymentRequest) -> str:
    structlog.contextvars.bind_contextvars(payment_id=payment.id)
    moved = _persist(
        lambda: rt.store.transition(
            rec.account,
            rec.reference_id,
            State.PENDING,
            sources=[State.CREATING],
            next_step="track",
            delay=rt.settings.poll_first_delay,
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
    _record_move(rt, rec, State.PENDING, moved)
    if not moved.moved:
        # Only an operator can have moved it meanwhile; the payment exists, so say so loudly.
        log.error("create.outcome_not_recorded", payment_id=payment.id, state=moved.previous)
        return "created_not_recorded"
    return "created"


def _end_create(rt: Runtime, rec: PaymentRecord, target: State, error: str, marked: bool) -> str:
    moved = _persist(
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
    _record_move(rt, rec, target, moved)
    log.warning("create.ended", state=target.value, error=error)
    return target.value


def _retry_create(rt: Runtime, rec: PaymentRecord, exc: ApiError, marked: bool) -> str:
    attempts = rec.attempts + (1 if marked else 0)
    if attempts >= rt.settings.create_max_attempts:
        return _end_create(
            rt, rec, State.FAILED, f"{attempts} attempts; last: {_describe(exc)}", marked
        )
    delay = retry_delay(
        max(attempts, 1),
        rt.rng,
        base=rt.settings.retry_base_delay,
        cap=rt.settings.retry_max_delay,
        retry_after=exc.retry_after,
    )
    target = State.CREATING if marked else State(rec.state)
    _reschedule(
        rt,
        rec,
        target,
        "create",
        delay,
        guard=("phase", "sent") if marked else ("phase", ""),
        fields={"phase": "", "last_error": _describe(exc)},
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
        _reschedule(rt, rec, State.CREATING, "create", give_up_at - now, guard=("phase", "sent"))
        return "in_flight_elsewhere"
    if settings.retry_ambiguous_create:
        _reschedule(
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


# --- track ------------------------------------------------------------------------------------


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
        payment = rt.client.get_payment(account, rec.payment_id, max_wait=rt.settings.max_wait)
    except SlotTooFar as exc:
        _reschedule(rt, rec, State.PENDING, "track", exc.retry_in)
        return "far_slot"
    except NotFound as exc:
        return _end_track(rt, rec, State.FAILED, _describe(exc))
    except ApiError as exc:
        # A GET changes nothing: every failure is retried, with backoff, until the deadline.
        errors = int(rt.redis.hincrby(rt.keys.payment(account, reference_id), "errors", 1))
        delay = retry_delay(
            errors,
            rt.rng,
            base=rt.settings.retry_base_delay,
            cap=rt.settings.poll_max_delay,
            retry_after=exc.retry_after,
        )
        _reschedule(
            rt,
            rec,
            State.PENDING,
            "track",
            min(delay, max(deadline - time.time(), 0)),
            fields={"last_error": _describe(exc)},
        )
        return "retry"

    status = payment.status
    terminal = from_api_status(status)
    if terminal is not None:
        moved = _persist(
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
        _record_move(rt, rec, terminal, moved)
        return terminal.value
    if status.lower() not in KNOWN_STATUSES:
        # api-contract.md: new statuses can appear without a version bump. Keep polling.
        metrics.record_unknown_status(account)
        log.warning("payment.unknown_status", status=status[:64])
    delay = rt.schedule.delay(rec.polls + 1, rt.rng)
    delay = min(delay, max(deadline - time.time(), 0.0))
    _persist(
        lambda: rt.store.transition(
            account,
            reference_id,
            State.PENDING,
            sources=[State.PENDING],
            next_step="track",
            delay=delay,
            fields={"api_status": status, "errors": 0, "last_error": ""},
            increments={"polls": 1},
        )
    )
    return "polled"


def _end_track(rt: Runtime, rec: PaymentRecord, target: State, error: str) -> str:
    moved = _persist(
        lambda: rt.store.transition(
            rec.account,
            rec.reference_id,
            target,
            sources=[State.PENDING],
            next_step="",
            fields={"last_error": error},
        )
    )
    _record_move(rt, rec, target, moved)
    log.warning("track.ended", state=target.value, error=error)
    return target.value


def _reschedule(
    rt: Runtime,
    rec: PaymentRecord,
    state: State,
    step: str,
    delay: float,
    *,
    guard: tuple[str, str] | None = None,
    fields: dict[str, str | int | float] | None = None,
) -> Transition:
    """Keep the payment in ``state`` and make its next ``step`` due ``delay`` seconds from now."""
    return _persist(
        lambda: rt.store.transition(
            rec.account,
            rec.reference_id,
            state,
            sources=[state],
            next_step=step,
            delay=delay,
            guard=guard,
            fields=fields,
        )
    )
