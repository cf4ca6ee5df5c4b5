"""One endpoint's queue of undelivered webhooks, its dead letters and its state, in Redis.

The queue is a stream holding exactly the events not delivered yet, oldest first: the router
appends, the driver deletes an entry once its endpoint answered 2xx (so a driver killed between
the answer and the delete sends it once more, under the same ``webhook-id``). An event past
``PAYPOLL_WEBHOOK_RETRY_FOR`` moves to the dead-letter stream in one transaction; a replay moves
it back, with its id and body unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from worker.keys import Keys

HEALTHY = "healthy"
FAILING = "failing"
DISABLED = "disabled"
STATES = (HEALTHY, FAILING, DISABLED)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


@dataclass(frozen=True)
class QueuedWebhook:
    """One webhook waiting for delivery (or dead-lettered)."""

    entry_id: str  # the entry in the queue (or dead-letter) stream
    msg_id: str  # the webhook-id: the same on every attempt, replay included
    type: str
    body: bytes  # fixed when routed: every attempt sends the same bytes
    at: float  # when the transition happened (Redis clock): the delivery lag starts here
    account: str
    reference_id: str
    error: str = ""  # dead letters: the last failure

    def fields(self) -> dict[Any, Any]:
        """The stream fields this webhook is stored as."""
        data: dict[Any, Any] = {
            "msg_id": self.msg_id,
            "type": self.type,
            "body": self.body,
            "at": repr(self.at),
            "account": self.account,
            "reference_id": self.reference_id,
        }
        if self.error:
            data["error"] = self.error
        return data

    @classmethod
    def parse(cls, entry_id: Any, fields: Mapping[Any, Any]) -> QueuedWebhook:
        f = {_text(k): v for k, v in fields.items()}
        body = f.get("body", b"")
        return cls(
            entry_id=_text(entry_id),
            msg_id=_text(f.get("msg_id")),
            type=_text(f.get("type")),
            body=body if isinstance(body, bytes) else str(body).encode(),
            at=float(_text(f.get("at")) or 0),
            account=_text(f.get("account")),
            reference_id=_text(f.get("reference_id")),
            error=_text(f.get("error")),
        )


@dataclass(frozen=True)
class EndpointState:
    """What an endpoint's driver knows about it (kept in Redis, so a new driver goes on)."""

    status: str = HEALTHY
    failures: int = 0  # failed attempts in a row
    next_probe_at: float = 0.0  # Redis clock: when a failing endpoint is tried again
    last_error: str = ""
    disabled_reason: str = ""


class EndpointQueue:
    """The Redis side of one endpoint (all its keys under one hash tag)."""

    def __init__(self, client: redis.Redis, keys: Keys, endpoint: str) -> None:
        self.client = client
        self.keys = keys
        self.endpoint = endpoint
        self.queue_key = keys.webhook(endpoint, "queue")
        self.dead_key = keys.webhook(endpoint, "dead")
        self.state_key = keys.webhook(endpoint, "state")

    # --- the queue ----------------------------------------------------------------------
    def backlog(self) -> int:
        """Webhooks not delivered yet."""
        return int(self.client.xlen(self.queue_key))

    def peek(self, count: int, *, after: str | None = None) -> list[QueuedWebhook]:
        """The oldest ``count`` undelivered webhooks (after entry ``after``, exclusive)."""
        low = f"({after}" if after else "-"
        entries: Any = self.client.xrange(self.queue_key, min=low, count=count)
        return [QueuedWebhook.parse(i, f) for i, f in entries]

    def delivered(self, webhook: QueuedWebhook) -> None:
        """Forget a webhook its endpoint accepted."""
        self.client.xdel(self.queue_key, webhook.entry_id)

    def dead_letter(self, webhook: QueuedWebhook, error: str) -> None:
        """Move a webhook out of the queue into the dead letters, atomically."""
        dead = QueuedWebhook(**{**webhook.__dict__, "error": error[:500]})
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.dead_key, dead.fields())
        pipe.xdel(self.queue_key, webhook.entry_id)
        pipe.execute()

    # --- dead letters -------------------------------------------------------------------
    def dead_letters(self, count: int | None = None) -> list[QueuedWebhook]:
        """Dead-lettered webhooks, oldest first."""
        entries: Any = self.client.xrange(self.dead_key, count=count)
        return [QueuedWebhook.parse(i, f) for i, f in entries]

    def replay(self, msg_ids: Iterable[str] | None = None) -> int:
        """Put dead letters back at the end of the queue (all of them, or those whose
        webhook-id is in ``msg_ids``) with their id and body unchanged; how many."""
        wanted = None if msg_ids is None else set(msg_ids)
        moved = 0
        for dead in self.dead_letters():
            if wanted is not None and dead.msg_id not in wanted:
                continue
            fresh = QueuedWebhook(**{**dead.__dict__, "error": ""})
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(self.queue_key, fresh.fields())
            pipe.xdel(self.dead_key, dead.entry_id)
            pipe.execute()
            moved += 1
        return moved

    # --- state --------------------------------------------------------------------------
    def state(self) -> EndpointState:
        raw = {_text(k): _text(v) for k, v in self.client.hgetall(self.state_key).items()}
        return EndpointState(
            status=raw.get("status") or HEALTHY,
            failures=int(raw.get("failures") or 0),
            next_probe_at=float(raw.get("next_probe_at") or 0),
            last_error=raw.get("last_error", ""),
            disabled_reason=raw.get("disabled_reason", ""),
        )

    def save_state(self, state: EndpointState) -> None:
        self.client.hset(
            self.state_key,
            mapping={
                "status": state.status,
                "failures": state.failures,
                "next_probe_at": repr(state.next_probe_at),
                "last_error": state.last_error[:500],
                "disabled_reason": state.disabled_reason[:500],
            },
        )

    def enable(self) -> EndpointState:
        """Send to a disabled (or failing) endpoint again, from its oldest webhook, now."""
        state = EndpointState(status=HEALTHY)
        self.save_state(state)
        return state
