"""The router: events stream -> each endpoint's queue, with the webhook's body fixed once.

Reads the events stream through consumer group ``paypoll-webhooks`` (created by the fleet's
supervisor before any worker starts, so no transition falls before it). For each event an
endpoint wants, it reads the payment's record for the body, then in one transaction appends
the webhook to the endpoint's queue and acknowledges the event: an event is either routed and
acked, or neither, whenever the router dies. Events no endpoint wants are acknowledged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
import structlog

from worker.events import Event, GroupReader, Subscription, ensure_group
from worker.keys import Keys
from worker.store import PaymentStore
from worker.webhooks.endpoints import Endpoints, event_name
from worker.webhooks.queue import QueuedWebhook

log = structlog.get_logger("paypoll.webhooks")

WEBHOOK_GROUP = "paypoll-webhooks"
ROUTER_RECLAIM_AFTER = 10.0  # seconds: a dead router's events are taken over after this


def iso8601(at: float) -> str:
    """``at`` (epoch seconds) as an ISO 8601 UTC timestamp with microseconds."""
    return (
        datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    )


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def webhook_body(event: Event, record: dict[str, str]) -> bytes:
    """The JSON body of ``event``'s webhook (only ever add fields)."""
    data = {
        "account": event.account,
        "reference_id": event.reference_id,
        "payment_id": event.payment_id or record.get("payment_id") or None,
        "state": event.state,
        "previous_state": event.previous or None,
        "url": record.get("url") or None,
        "amount": record.get("amount") or None,
        "currency": record.get("currency") or None,
        "polls": _number(record.get("polls", "0") or "0"),
        "error": event.error or None,
        "event_id": event.id,
    }
    payload = {
        "type": f"payment.{event_name(event.state)}",
        "timestamp": iso8601(event.at),
        "data": data,
    }
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def msg_id(event: Event) -> str:
    """The webhook-id of ``event``: its stream entry id, the same on every attempt."""
    return f"msg_{event.id}"


def prepare(client: redis.Redis, keys: Keys) -> None:
    """Create the router's group (at the stream's end) before any worker runs a step."""
    ensure_group(client, keys, WEBHOOK_GROUP, start="$")


class Router(GroupReader):
    """Routes chosen events into their endpoints' queues until :meth:`stop`."""

    retry_event = "webhooks.router_retry"

    def __init__(
        self,
        *,
        store: PaymentStore,
        endpoints: Endpoints,
        consumer: str,
        notify: Callable[[str], None] | None = None,
        events_cap: int | None = None,
    ) -> None:
        super().__init__(
            name="paypoll-webhook-router",
            client=store.redis,
            keys=store.keys,
            group=WEBHOOK_GROUP,
            consumer=consumer,
            reclaim_after=ROUTER_RECLAIM_AFTER,
            events_cap=events_cap,
        )
        self.store = store
        self.endpoints = endpoints
        self.notify = notify  # called with an endpoint's name when a webhook was queued for it

    def handle(self, subscription: Subscription, events: list[Event]) -> None:
        self.route(subscription, events)

    def route(self, subscription: Subscription, events: list[Event]) -> int:
        """Queue the events endpoints want and ack all of them; how many were queued."""
        keys = self.store.keys
        unwanted: list[Event] = []
        queued = 0
        touched: set[str] = set()
        for event in events:
            endpoint = self.endpoints.route(event.account, event.state)
            if endpoint is None:
                unwanted.append(event)
                continue
            raw: Any = self.store.redis.hgetall(keys.payment(event.account, event.reference_id))
            record = {k.decode(): v.decode() for k, v in raw.items()}
            webhook = QueuedWebhook(
                entry_id="",
                msg_id=msg_id(event),
                type=f"payment.{event_name(event.state)}",
                body=webhook_body(event, record),
                at=event.at,
                account=event.account,
                reference_id=event.reference_id,
            )
            queue = keys.webhook(endpoint.name, "queue")
            if keys.cluster:
                # The three keys are in three slots, and no transaction spans slots: queued,
                # listed, then acked, one after the other, so a router that dies in between
                # queues the event again (the same webhook-id: receivers de-duplicate on it).
                self.store.redis.xadd(queue, webhook.fields())
                self.store.redis.sadd(keys.webhook_endpoints(), endpoint.name)
                self.store.redis.xack(keys.events(), WEBHOOK_GROUP, event.id)
            else:
                pipe = self.store.redis.pipeline(transaction=True)
                pipe.xadd(queue, webhook.fields())
                pipe.sadd(keys.webhook_endpoints(), endpoint.name)
                pipe.xack(keys.events(), WEBHOOK_GROUP, event.id)
                pipe.execute()
            queued += 1
            touched.add(endpoint.name)
        if unwanted:
            subscription.ack(*unwanted)
        if self.notify is not None:
            for name in touched:
                self.notify(name)
        return queued
