"""The callback outbox: final transitions sent to the user's dramatiq actor from the events stream.

``PAYPOLL_CALLBACK_ACTOR`` names an actor of the user's own dramatiq application. It used to be
sent from the step that made the transition, after the transition: a worker killed between the
two lost the callback. Now the transition itself is the outbox: ``transition.lua`` appends it to
the events stream in the same atomic step, and this thread reads the stream through consumer
group ``paypoll-callbacks``, sends each final transition, and only then acknowledges it. A
killed sender leaves the event pending: it is sent again when the process comes back (its
consumer re-reads its own pending events first) or by another fleet's sender once it has been
pending ``CALLBACK_RECLAIM_AFTER`` seconds. At-least-once, so every callback carries the event
id (``event_id``) for the receiver to de-duplicate on.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import dramatiq
import redis
import structlog

from worker import metrics
from worker.events import Event, GroupReader, Subscription, ensure_group
from worker.keys import Keys
from worker.store import FINAL

log = structlog.get_logger("paypoll.outbox")

CALLBACK_GROUP = "paypoll-callbacks"
# A sender silent this long (killed, partitioned) has its pending callbacks taken by another.
CALLBACK_RECLAIM_AFTER = 10.0
CALLBACK_STATES: frozenset[str] = frozenset(state.value for state in FINAL)
"""The states sent: the final ones, as before the outbox."""


def consumer_name(index: int, fleet: int | str) -> str:
    """The consumer name of worker process ``index`` of fleet ``fleet`` (its metrics port:
    two fleets on one host cannot share it) on this host: stable across restarts, so a
    restarted process re-reads what it had not acknowledged before it died."""
    return f"{socket.gethostname()}-{fleet}-{index}"


def callback_payload(event: Event) -> dict[str, Any]:
    """The one argument the user's actor receives for ``event`` (only ever add fields)."""
    return {
        "account": event.account,
        "reference_id": event.reference_id,
        "state": event.state,
        "payment_id": event.payment_id or None,
        "event_id": event.id,
        "at": event.at,
    }


def actor_target(spec: str) -> tuple[str, str]:
    """(queue, actor) of ``PAYPOLL_CALLBACK_ACTOR`` (``actor`` or ``queue:actor``)."""
    queue, _, actor = spec.rpartition(":")
    return queue or "default", actor


def prepare(client: redis.Redis, keys: Keys) -> None:
    """Create the outbox's group before any worker runs a step, so that no transition made by
    this fleet falls before it (a group starts at the stream's end)."""
    ensure_group(client, keys, CALLBACK_GROUP, start="$")


class CallbackOutbox(GroupReader):
    """Sends final transitions from the events stream to the user's actor, then acks them."""

    retry_event = "callbacks.retry"

    def __init__(
        self,
        *,
        client: redis.Redis,
        keys: Keys,
        broker: Any,
        actor_spec: str,
        consumer: str,
        events_cap: int | None = None,
        reclaim_after: float = CALLBACK_RECLAIM_AFTER,
    ) -> None:
        super().__init__(
            name="paypoll-callbacks",
            client=client,
            keys=keys,
            group=CALLBACK_GROUP,
            consumer=consumer,
            reclaim_after=reclaim_after,
            events_cap=events_cap,
        )
        self.broker = broker
        self.queue, self.actor = actor_target(actor_spec)

    def handle(self, subscription: Subscription, events: list[Event]) -> None:
        """Send each final transition, then ack it (a crash in between sends it again)."""
        for event in events:
            if event.state in CALLBACK_STATES:
                self._send(event)
            subscription.ack(event)

    def _send(self, event: Event) -> None:
        started = time.perf_counter()
        self.broker.enqueue(
            dramatiq.Message(
                queue_name=self.queue,
                actor_name=self.actor,
                args=(callback_payload(event),),
                kwargs={},
                options={},
            )
        )
        metrics.CALLBACKS_SENT.labels(event.state).inc()
        log.debug(
            "callbacks.sent",
            reference_id=event.reference_id,
            account=event.account,
            state=event.state,
            event_id=event.id,
            took=round(time.perf_counter() - started, 4),
        )
