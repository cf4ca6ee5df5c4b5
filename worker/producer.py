"""The producer interface: submit payments, track payments made elsewhere, look them up.

These are the calls users make from Python (exported by ``worker``) and that the CLI wraps.
A producer needs Redis only: it records a validated payment as ``queued`` with its create step
due now, and the sweeper of the worker fleet dispatches it. Submitting is idempotent per
(account, reference_id).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from worker.connection import connect_redis
from worker.errors import ReplicationLag, ValidationError
from worker.events import RECLAIM_AFTER, Subscription
from worker.settings import Settings, load_settings
from worker.store import PaymentRecord, PaymentSpec, PaymentStore
from worker.validation import validate_payment, validate_reference_id
from worker.wait import DEFAULT_TIMEOUT
from worker.wait import wait_for as _wait_for

SUBMIT_CHUNK = 500  # payments per pipelined round trip when submitting many


@dataclass
class Producer:
    """Submits and reads payments with one Settings and one store."""

    settings: Settings
    store: PaymentStore

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Producer:
        """A Producer on ``settings`` (default: read from the environment)."""
        settings = settings if settings is not None else load_settings()
        client = connect_redis(settings.redis_url)
        store = PaymentStore(
            redis=client, keys=settings.keys(), events_maxlen=settings.events_maxlen
        )
        return cls(settings=settings, store=store)

    def validate(self, **fields: Any) -> PaymentSpec:
        """The payment normalised, or ValidationError listing every bad field with its reason."""
        return validate_payment(accounts=self.settings.accounts, **fields)

    def submit_payment(
        self,
        *,
        account: str,
        amount: str | int,
        redirect_url: str,
        currency: str = "USD",
        reference_id: str | None = None,
    ) -> str:
        """Validate and record one payment; returns its reference_id (generated when absent).

        Submitting the same payment twice is harmless; a reference_id already used for another
        payment of the account raises ValidationError.
        """
        spec = self.validate(
            account=account,
            amount=amount,
            currency=currency,
            redirect_url=redirect_url,
            reference_id=reference_id,
        )
        if self.store.submit(spec):
            self.wake(spec.account)  # a re-submit has its create scheduled already
        self._replicated()
        return spec.reference_id

    def _replicated(self) -> None:
        """Under Sentinel: return only once a replica holds what was just recorded, so that a
        submit that returned survives a failover; ReplicationLag otherwise (submitting again
        is harmless: submits are idempotent)."""
        wanted = self.settings.wait_replicas()
        if not wanted:
            return
        acked = int(self.store.redis.wait(wanted, int(self.settings.redis_wait_timeout * 1000)))
        if acked < wanted:
            raise ReplicationLag(acked, wanted)

    def wake(self, account: str) -> None:
        """Tell the fleet's sweepers that ``account`` has new work, so that its create is
        dispatched now rather than at the next pass (best effort: a sweeper that misses it
        finds the work at its next pass anyway)."""
        # The payment is recorded already; a failed publish loses only the shortcut.
        with contextlib.suppress(redis.RedisError):
            self.store.redis.publish(self.store.keys.wake(), account)

    def submit_specs(self, specs: Iterable[PaymentSpec]) -> Iterator[bool | ValidationError]:
        """Record already validated payments, pipelined; yields per payment True (recorded),
        False (already there) or the ValidationError of a conflicting reference_id."""
        chunk: list[PaymentSpec] = []
        for spec in specs:
            chunk.append(spec)
            if len(chunk) >= SUBMIT_CHUNK:
                yield from self._submit_chunk(chunk)
                chunk = []
        if chunk:
            yield from self._submit_chunk(chunk)

    def _submit_chunk(self, chunk: list[PaymentSpec]) -> Iterator[bool | ValidationError]:
        outcomes = self.store.submit_many(chunk)
        self._replicated()
        recorded = (spec.account for spec, new in zip(chunk, outcomes, strict=True) if new is True)
        for account in dict.fromkeys(recorded):
            self.wake(account)
        yield from outcomes

    def track_payment(
        self, *, account: str, payment_id: str, reference_id: str | None = None
    ) -> str:
        """Track a payment request created elsewhere; returns its reference_id.

        Without ``reference_id`` the payment is recorded as ``track-<payment_id>``.
        """
        self.settings.account(account)
        if not isinstance(payment_id, str) or not payment_id.strip():
            raise ValidationError("payment_id", "is required: the id the API gave the payment")
        ref = validate_reference_id(reference_id) if reference_id else f"track-{payment_id}"
        validate_reference_id(ref)
        if self.store.register_tracking(account, ref, payment_id.strip()):
            self.wake(account)  # its first poll is due now
        return ref

    def get_payment(self, reference_id: str, *, account: str | None = None) -> PaymentRecord:
        """The record of ``reference_id`` (in ``account``, or the only account that has it)."""
        found = self.store.find(reference_id, account)
        if not found:
            where = f" in account {account!r}" if account else ""
            raise ValidationError("reference_id", f"no payment {reference_id!r}{where}")
        if len(found) > 1:
            names = ", ".join(r.account for r in found)
            raise ValidationError(
                "account", f"{reference_id!r} exists in several accounts ({names}): name one"
            )
        return found[0]

    def wait_for(
        self,
        reference_id: str,
        *,
        account: str | None = None,
        states: Iterable[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> PaymentRecord:
        """The record of ``reference_id`` as soon as it reaches one of ``states`` (default:
        its hosted url is known, or any later state), blocking on Redis; WaitTimeout after
        ``timeout`` seconds. See worker/wait.py."""
        if account is None:
            account = self.get_payment(reference_id).account
        return _wait_for(self.store, reference_id, account=account, states=states, timeout=timeout)

    def events(
        self,
        *,
        group: str,
        consumer: str,
        start: str = "$",
        accounts: Iterable[str] | None = None,
        reclaim_after: float = RECLAIM_AFTER,
    ) -> Subscription:
        """Payment transitions through consumer group ``group`` (created at ``start`` when new:
        ``$`` from now on, ``0`` the whole stream), as ``consumer``: iterate, and ``ack`` each
        event once handled. At-least-once; see worker/events.py."""
        return Subscription(
            self.store.redis,
            self.store.keys,
            group=group,
            consumer=consumer,
            start=start,
            accounts=accounts,
            reclaim_after=reclaim_after,
            events_cap=self.settings.events_maxlen,
        )

    def list_payments(
        self, *, account: str | None = None, state: str | None = None
    ) -> Iterator[PaymentRecord]:
        """Every payment, optionally of one account and/or in one state."""
        return self.store.iter_records(account=account, state=state)

    def counts(self, *, account: str | None = None) -> Mapping[str, int]:
        """Number of payments in each state."""
        return self.store.count_by_state(account)


_default: Producer | None = None


def default_producer() -> Producer:
    """The process's Producer built from the environment on first use."""
    global _default
    if _default is None:
        _default = Producer.from_settings()
    return _default


def submit_payment(
    *,
    account: str,
    amount: str | int,
    redirect_url: str,
    currency: str = "USD",
    reference_id: str | None = None,
    producer: Producer | None = None,
) -> str:
    """Validate and record a payment for the workers to create and track; returns its
    reference_id. Settings come from the environment unless a ``producer`` is given."""
    return (producer or default_producer()).submit_payment(
        account=account,
        amount=amount,
        redirect_url=redirect_url,
        currency=currency,
        reference_id=reference_id,
    )


def track_payment(
    *,
    account: str,
    payment_id: str,
    reference_id: str | None = None,
    producer: Producer | None = None,
) -> str:
    """Track a payment request created elsewhere; returns its reference_id."""
    return (producer or default_producer()).track_payment(
        account=account, payment_id=payment_id, reference_id=reference_id
    )


def get_payment(
    reference_id: str, *, account: str | None = None, producer: Producer | None = None
) -> PaymentRecord:
    """The current record of a payment."""
    return (producer or default_producer()).get_payment(reference_id, account=account)


def wait_for(
    reference_id: str,
    *,
    account: str | None = None,
    states: Iterable[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    producer: Producer | None = None,
) -> PaymentRecord:
    """Block until the payment reaches one of ``states`` (default: its hosted ``url`` is
    known, or any later state) and return its record; ``worker.WaitTimeout`` after
    ``timeout`` seconds."""
    return (producer or default_producer()).wait_for(
        reference_id, account=account, states=states, timeout=timeout
    )


def events(
    *,
    group: str,
    consumer: str,
    start: str = "$",
    accounts: Iterable[str] | None = None,
    reclaim_after: float = RECLAIM_AFTER,
    producer: Producer | None = None,
) -> Subscription:
    """Payment transitions through a Redis consumer group, at-least-once with explicit ack::

        with worker.events(group="shop", consumer="web-1") as events:
            for event in events:
                handle(event)
                events.ack(event)

    See :meth:`Producer.events`."""
    return (producer or default_producer()).events(
        group=group, consumer=consumer, start=start, accounts=accounts, reclaim_after=reclaim_after
    )


def list_payments(
    *, account: str | None = None, state: str | None = None, producer: Producer | None = None
) -> Iterator[PaymentRecord]:
    """Every payment, optionally filtered."""
    return (producer or default_producer()).list_payments(account=account, state=state)
