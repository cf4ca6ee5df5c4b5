"""The payment state machine: which states exist and which moves between them are allowed.

A payment only moves forward. The one way back is an operator's explicit decision about a
``create_unknown`` payment (see :data:`OPERATOR_MOVES`).
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where a payment is in its life."""

    QUEUED = "queued"  # accepted by a producer, create not yet attempted
    CREATING = "creating"  # the create step is running or waiting for a retry
    PENDING = "pending"  # created on the API; tracked until terminal
    PAID = "paid"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    REJECTED = "rejected"  # the API refused the create (400/422); never retried
    CREATE_UNKNOWN = (
        "create_unknown"  # the create was sent and its answer lost: an operator decides
    )
    TRACKING_TIMEOUT = "tracking_timeout"  # not terminal on the API before tracking_timeout
    FAILED = "failed"  # retries exhausted, or the payment vanished (404)


ALL_STATES: tuple[State, ...] = tuple(State)

API_TERMINAL: frozenset[State] = frozenset({State.PAID, State.EXPIRED, State.CANCELLED})
"""Terminal statuses of the API itself (api-contract.md)."""

FINAL: frozenset[State] = API_TERMINAL | {
    State.REJECTED,
    State.CREATE_UNKNOWN,
    State.TRACKING_TIMEOUT,
    State.FAILED,
}
"""States paypoll does nothing more about on its own."""

ACTIVE: frozenset[State] = frozenset({State.QUEUED, State.CREATING, State.PENDING})
"""States that always have a next step due (invariant 4)."""

ALLOWED: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.QUEUED, State.CREATING, State.REJECTED, State.FAILED}),
    State.CREATING: frozenset(
        {State.CREATING, State.PENDING, State.REJECTED, State.CREATE_UNKNOWN, State.FAILED}
    ),
    State.PENDING: frozenset(
        {State.PENDING} | API_TERMINAL | {State.TRACKING_TIMEOUT, State.FAILED}
    ),
}
"""Moves the workers may make. ``X -> X`` records progress (an attempt, a poll) in place."""

OPERATOR_MOVES: dict[State, frozenset[State]] = {
    # After checking with the provider: it exists (track it), it does not (post again), give up.
    State.CREATE_UNKNOWN: frozenset({State.PENDING, State.QUEUED, State.FAILED}),
    State.TRACKING_TIMEOUT: frozenset({State.PENDING}),
    State.FAILED: frozenset({State.PENDING, State.QUEUED}),
}
"""Moves only an operator makes (``paypoll resolve``)."""


def sources_of(target: State, *, operator: bool = False) -> frozenset[State]:
    """Every state from which a move to ``target`` is allowed."""
    table = OPERATOR_MOVES if operator else ALLOWED
    return frozenset(source for source, targets in table.items() if target in targets)


def from_api_status(status: str) -> State | None:
    """The terminal State of an API status, or None when the API status is not terminal.

    Unknown statuses (api-contract.md: new ones can appear) are treated as not terminal.
    """
    try:
        state = State(status.lower())
    except ValueError:
        return None
    return state if state in API_TERMINAL else None
