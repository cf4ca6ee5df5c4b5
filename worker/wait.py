"""Block until a payment reaches a state: what a checkout page needs to send the payer on.

``transition.lua`` publishes every change of a payment's state on the payment's own channel
(``Keys.changes``). A waiter subscribes first, then reads the record (so no change can fall
between the read and the subscription), and re-reads the record only when its channel says
the state changed: no polling of Redis. Pub/sub keeps nothing, so a lost connection is
followed by a fresh subscription and a fresh read before waiting again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from worker.errors import ValidationError, WaitTimeout
from worker.store import PaymentRecord, PaymentStore, State

# The hosted url is known from `pending` on; every state after it (final or needing an
# operator) is an answer too: a waiter for the url must not wait out its timeout on a
# rejected or failed payment.
URL_KNOWN: frozenset[str] = frozenset(s.value for s in State) - {
    State.QUEUED.value,
    State.CREATING.value,
}
DEFAULT_TIMEOUT = 30.0  # seconds: an idle key answers in well under one
RECONNECT_PAUSE = 0.2  # seconds before resubscribing after the connection failed


def awaited_states(states: Iterable[str] | None) -> frozenset[str]:
    """The states to wait for, checked: ValidationError naming ``states`` for an unknown one."""
    if states is None:
        return URL_KNOWN
    wanted = frozenset(str(s) for s in states)
    known = {s.value for s in State}
    unknown = sorted(wanted - known)
    if unknown or not wanted:
        reason = f"unknown state(s) {', '.join(unknown)}" if unknown else "no state given"
        raise ValidationError("states", f"{reason}; states are {', '.join(sorted(known))}")
    return wanted


def wait_for(
    store: PaymentStore,
    reference_id: str,
    *,
    account: str,
    states: Iterable[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> PaymentRecord:
    """The record of ``(account, reference_id)`` as soon as it is in one of ``states``
    (default: the hosted url is known, or any later state), at once if it already is.

    Raises ValidationError when the payment does not exist or an argument is bad, and
    WaitTimeout (with the last state seen) after ``timeout`` seconds.
    """
    wanted = awaited_states(states)
    if not timeout > 0:
        raise ValidationError("timeout", f"must be a positive number of seconds, not {timeout!r}")
    channel = store.keys.changes(account, reference_id)
    deadline = time.monotonic() + timeout
    last = ""

    def timed_out() -> WaitTimeout:
        return WaitTimeout(
            account=account,
            reference_id=reference_id,
            states=tuple(sorted(wanted)),
            last_state=last or "unknown",
            timeout=timeout,
        )

    while True:
        pubsub = store.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
        try:
            pubsub.subscribe(channel)
            record = store.get(account, reference_id)
            if record is None:
                raise ValidationError(
                    "reference_id", f"no payment {reference_id!r} in account {account!r}"
                )
            while True:
                last = record.state
                if record.state in wanted:
                    return record
                left = deadline - time.monotonic()
                if left <= 0:
                    raise timed_out()
                if pubsub.get_message(timeout=left) is not None:
                    fresh = store.get(account, reference_id)
                    record = fresh if fresh is not None else record
        except (redis.ConnectionError, redis.TimeoutError):
            # A message may have been missed while disconnected: subscribe and read again.
            if time.monotonic() + RECONNECT_PAUSE >= deadline:
                raise timed_out() from None
            time.sleep(RECONNECT_PAUSE)
        finally:
            pubsub.close()
