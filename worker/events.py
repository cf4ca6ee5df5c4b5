"""Payment transitions as events: read the stream, or consume it through a consumer group.

``transition.lua`` appends every change of a payment's state to one capped Redis stream
(``Keys.events``). This module reads it two ways:

- :func:`tail_events` / :func:`recent_events`: read-only, for people (``paypoll events``);
- :class:`Subscription`: a Redis consumer group, for systems. At-least-once: an event stays
  pending for its consumer until :meth:`Subscription.ack`; a consumer re-reads its own pending
  entries first when it comes back, and entries left pending by a consumer that went away are
  claimed by another after ``reclaim_after`` seconds (XAUTOCLAIM). Receivers de-duplicate by
  the event id, which never changes.

The stream is capped (``PAYPOLL_EVENTS_MAXLEN``, approximate trimming): a group that falls
further behind than the cap loses the oldest events it has not read. That is never silent:
the group's lag is a metric with an alert near the cap, and a subscriber that finds events
trimmed before it read them logs ``events.trimmed_unread`` with their number and counts them
in ``paypoll_events_trimmed_unread_total``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import structlog

from worker import metrics
from worker.errors import ValidationError
from worker.keys import Keys

log = structlog.get_logger("paypoll.events")

BLOCK_MS = 1000  # longest a read blocks for new events: how often a consumer checks its stop
BATCH = 100  # events per read
READER_BLOCK_MS = 500  # a GroupReader thread's reads: how soon it sees its stop
RETRY_PAUSE = 1.0  # seconds a GroupReader waits after a Redis error before reading again
# Seconds an event may stay pending for a silent consumer before another consumer takes it.
RECLAIM_AFTER = 30.0
LAG_CHECK_EVERY = 5.0  # seconds between two looks at the group's lag and the stream's cap
LAG_WARN_SHARE = 0.8  # warn when a group's unread events reach this share of the stream's cap


def _script(name: str) -> str:
    return Path(__file__).with_name(name).read_text(encoding="utf-8")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def check_entry_id(value: str, field: str = "since") -> str:
    """``value`` if it is a stream entry id (``ms`` or ``ms-seq``); ValidationError naming
    ``field`` otherwise."""
    head, _, seq = value.partition("-")
    if head.isdigit() and (seq == "" or seq.isdigit()) and not value.endswith("-"):
        return value
    raise ValidationError(field, f"expected an event id like 1700000000000-0, not {value!r}")


@dataclass(frozen=True)
class Event:
    """One change of a payment's state, as recorded in the events stream."""

    id: str
    """The stream entry id: unique, ordered, the same on every delivery (de-duplicate on it)."""
    account: str
    reference_id: str
    previous: str
    state: str
    at: float
    """When the change happened (Redis clock, seconds since the epoch)."""
    payment_id: str
    error: str

    def to_json(self) -> dict[str, object]:
        """The event as a JSON object (a stable interface: only ever add fields)."""
        return {
            "id": self.id,
            "account": self.account,
            "reference_id": self.reference_id,
            "from": self.previous,
            "state": self.state,
            "at": self.at,
            "payment_id": self.payment_id or None,
            "error": self.error or None,
        }


def parse_event(entry_id: Any, fields: Mapping[Any, Any]) -> Event:
    """The Event of one stream entry (as redis-py returns it)."""
    f = {_text(k): _text(v) for k, v in fields.items()}
    try:
        at = float(f.get("at", "0") or 0)
    except ValueError:
        at = 0.0
    return Event(
        id=_text(entry_id),
        account=f.get("account", ""),
        reference_id=f.get("reference_id", ""),
        previous=f.get("from", ""),
        state=f.get("to", ""),
        at=at,
        payment_id=f.get("payment_id", ""),
        error=f.get("error", ""),
    )


def _matches(event: Event, accounts: frozenset[str] | None) -> bool:
    return accounts is None or event.account in accounts


def recent_events(
    client: redis.Redis,
    keys: Keys,
    *,
    since: str | None = None,
    last: int | None = 20,
    accounts: Iterable[str] | None = None,
) -> list[Event]:
    """Past events, oldest first, of ``accounts`` (all when None): the first ``last`` after
    ``since`` (an entry id; all of them when ``last`` is None), or without ``since`` the
    ``last`` most recent ones."""
    wanted = frozenset(accounts) if accounts else None
    stream = keys.events()
    limit = last if last is not None else float("inf")
    events: list[Event] = []
    if since is not None:
        cursor = f"({since}"
        while len(events) < limit:
            page: Any = client.xrange(stream, min=cursor, count=BATCH)
            events.extend(e for e in (parse_event(i, f) for i, f in page) if _matches(e, wanted))
            if len(page) < BATCH:
                break
            cursor = f"({_text(page[-1][0])}"
        return events[:last] if last is not None else events
    if not last:
        return []
    cursor = "+"
    # Walk back in pages until ``last`` events of the wanted accounts are found.
    while len(events) < last:
        back: Any = client.xrevrange(stream, max=cursor, count=BATCH)
        events.extend(e for e in (parse_event(i, f) for i, f in back) if _matches(e, wanted))
        if len(back) < BATCH:
            break
        cursor = f"({_text(back[-1][0])}"
    return list(reversed(events[:last]))


def tail_events(
    client: redis.Redis,
    keys: Keys,
    *,
    after: str = "$",
    accounts: Iterable[str] | None = None,
    block_ms: int = BLOCK_MS,
    stop: Any = None,
) -> Iterator[Event]:
    """Events as they are appended after ``after`` (an entry id; ``$``: from now), forever or
    until ``stop`` (an object with ``is_set()``) is set. Read-only: no group, nothing acked."""
    wanted = frozenset(accounts) if accounts else None
    cursor = after
    stream = keys.events()
    if cursor == "$":
        # Resolve "now" once: re-reading with "$" would skip what arrives between two reads.
        info = client.xinfo_stream(stream) if client.exists(stream) else None
        cursor = _text(info["last-generated-id"]) if info else "0-0"
    while stop is None or not stop.is_set():
        reply: Any = client.xread({stream: cursor}, count=BATCH, block=block_ms)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                cursor = _text(entry_id)
                event = parse_event(entry_id, fields)
                if _matches(event, wanted):
                    yield event


@dataclass(frozen=True)
class GroupLag:
    """How far one consumer group is behind the events stream."""

    group: str
    consumers: int
    pending: int
    """Delivered to a consumer, not acknowledged yet."""
    lag: int | None
    """Appended, not delivered to the group yet (None when Redis cannot tell)."""
    last_delivered: str


def group_lags(client: redis.Redis, keys: Keys) -> list[GroupLag]:
    """Every consumer group of the events stream with its lag (empty without a stream)."""
    try:
        groups = client.xinfo_groups(keys.events())
    except redis.ResponseError:  # no stream yet
        return []
    lags = []
    for g in groups:
        raw_lag = g.get("lag")
        lags.append(
            GroupLag(
                group=_text(g["name"]),
                consumers=int(g.get("consumers", 0)),
                pending=int(g.get("pending", 0)),
                lag=None if raw_lag is None else int(raw_lag),
                last_delivered=_text(g.get("last-delivered-id")),
            )
        )
    return sorted(lags, key=lambda lag: lag.group)


def ensure_group(client: redis.Redis, keys: Keys, group: str, *, start: str = "$") -> bool:
    """Create consumer group ``group`` on the events stream at ``start`` (``$``: events from
    now on; ``0``: the whole stream) unless it exists. Returns True when it was created.

    The group's read counter is set too, so that Redis can report its lag from the start.
    """
    created = client.eval(_script("create_group.lua"), 1, keys.events(), group, start)
    if created:
        log.info("events.group_created", group=group, start=start)
    return bool(created)


class Subscription:
    """Events through consumer group ``group`` as consumer ``consumer``, at-least-once.

    Iterate to receive events; call :meth:`ack` once an event is handled (an event not acked
    is delivered again: to this consumer when it reads again after a restart, or to another
    consumer of the group once it has been pending ``reclaim_after`` seconds). ``accounts``
    filters: events of other accounts are acknowledged unseen. Iteration ends after
    :meth:`close` (from another thread, or a signal handler).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        group: str,
        consumer: str,
        start: str = "$",
        accounts: Iterable[str] | None = None,
        block_ms: int = BLOCK_MS,
        batch: int = BATCH,
        reclaim_after: float = RECLAIM_AFTER,
        events_cap: int | None = None,
    ) -> None:
        for name, value in (("group", group), ("consumer", consumer)):
            if not value or not value.strip():
                raise ValidationError(name, "must be a non-empty name")
        if start not in ("$", "0"):
            check_entry_id(start, "start")
        if not reclaim_after > 0:
            raise ValidationError("reclaim_after", f"must be > 0 seconds, not {reclaim_after!r}")
        self.client = client
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self.start = start
        self.accounts = frozenset(accounts) if accounts else None
        self.block_ms = block_ms
        self.batch = batch
        self.reclaim_after = reclaim_after
        self.events_cap = events_cap
        self._closed = False
        self._own_pending_done = False
        self._next_reclaim = 0.0
        self._next_lag_check = 0.0
        self._rebase = client.register_script(_script("rebase_group.lua"))
        ensure_group(client, keys, group, start=start)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- consuming -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Event]:
        while not self._closed:
            yield from self.read()

    def read(self) -> list[Event]:
        """The next events for this consumer (waiting up to ``block_ms`` for new ones): its
        own pending events first, then events reclaimed from silent consumers, then new ones."""
        now = time.monotonic()
        if now >= self._next_lag_check:
            self._next_lag_check = now + LAG_CHECK_EVERY
            self._check_trimmed()
        if not self._own_pending_done:
            events = self._read_group("0", block=None)
            if events:
                return events
            self._own_pending_done = True
        if now >= self._next_reclaim:
            self._next_reclaim = now + min(self.reclaim_after / 2, 5.0)
            events = self._reclaim()
            if events:
                return events
        return self._read_group(">", block=self.block_ms)

    def ack(self, *events: Event | str) -> int:
        """Acknowledge events (or entry ids): they are never delivered to the group again."""
        ids = [e.id if isinstance(e, Event) else e for e in events]
        if not ids:
            return 0
        return int(self.client.xack(self.keys.events(), self.group, *ids))

    def close(self) -> None:
        """End the iteration after the current read (pending events stay pending)."""
        self._closed = True

    def leave(self) -> None:
        """Remove this consumer from the group for good; its pending events go to the others
        (only when it stops for good: a consumer that comes back would rather re-read them)."""
        self.close()
        self.client.xgroup_delconsumer(self.keys.events(), self.group, self.consumer)

    # --- internals -------------------------------------------------------------------------
    def _read_group(self, cursor: str, *, block: int | None) -> list[Event]:
        try:
            reply: Any = self.client.xreadgroup(
                self.group,
                self.consumer,
                {self.keys.events(): cursor},
                count=self.batch,
                block=block,
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or the group was deleted under us (an operator, a Redis restart
            # without persistence): start again from its end, loudly.
            log.warning("events.group_recreated", group=self.group)
            ensure_group(self.client, self.keys, self.group, start="$")
            return []
        entries: list[tuple[Any, Any]] = []
        for _, stream_entries in reply or []:
            entries.extend(stream_entries)
        if cursor == "0" and entries:
            # Our own pending entries: those trimmed from the stream since come back empty.
            gone = [i for i, fields in entries if not fields]
            if gone:
                self._report_trimmed(len(gone), where="pending")
                self.ack(*[_text(i) for i in gone])
            entries = [(i, f) for i, f in entries if f]
            if not entries and gone:
                return self._read_group("0", block=None)
        return self._keep([parse_event(i, f) for i, f in entries])

    def _reclaim(self) -> list[Event]:
        reply: Any = self.client.xautoclaim(
            self.keys.events(),
            self.group,
            self.consumer,
            min_idle_time=int(self.reclaim_after * 1000),
            start_id="0-0",
            count=self.batch,
        )
        claimed = reply[1] if len(reply) > 1 else []
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:
            # Pending for a silent consumer and trimmed since: XAUTOCLAIM dropped them.
            self._report_trimmed(len(deleted), where="pending")
        events = [parse_event(i, f) for i, f in claimed if f]
        if events:
            log.info(
                "events.reclaimed", group=self.group, consumer=self.consumer, count=len(events)
            )
        return self._keep(events)

    def _keep(self, events: Sequence[Event]) -> list[Event]:
        if self.accounts is None:
            return list(events)
        refused = [e for e in events if e.account not in self.accounts]
        if refused:
            self.ack(*refused)
        return [e for e in events if e.account in self.accounts]

    def _check_trimmed(self) -> None:
        """Count (and skip past) events the cap trimmed before this group read them, and warn
        when the group's lag nears the cap."""
        reply = self._rebase(keys=[self.keys.events()], args=[self.group])
        trimmed, lag = int(reply[0]), int(reply[1])
        if trimmed > 0:
            self._report_trimmed(trimmed, where="unread")
        cap = self.events_cap
        if cap and lag >= LAG_WARN_SHARE * cap:
            log.warning(
                "events.group_lagging",
                group=self.group,
                lag=lag,
                cap=cap,
                hint="this group reads slower than events arrive; add consumers or raise "
                "PAYPOLL_EVENTS_MAXLEN before the cap trims events it has not read",
            )

    def _report_trimmed(self, count: int, *, where: str) -> None:
        metrics.EVENTS_TRIMMED_UNREAD.labels(group=self.group).inc(count)
        log.error(
            "events.trimmed_unread",
            group=self.group,
            count=count,
            where=where,
            hint="the events stream's cap (PAYPOLL_EVENTS_MAXLEN) dropped events this group had "
            "not handled; the payment records still hold every final state",
        )


class GroupReader(threading.Thread):
    """A daemon thread that reads the events stream through consumer group ``group`` as
    ``consumer`` and hands every batch to :meth:`handle`, until :meth:`stop`.

    A Redis error (a restart, a failover) is logged as ``retry_event`` and the subscription
    is rebuilt after ``RETRY_PAUSE``: what ``handle`` had not acknowledged is delivered again
    (own pending events first), so nothing is lost. Subclasses implement :meth:`handle`.
    """

    retry_event = "events.reader_retry"

    def __init__(
        self,
        *,
        name: str,
        client: redis.Redis,
        keys: Keys,
        group: str,
        consumer: str,
        reclaim_after: float = RECLAIM_AFTER,
        events_cap: int | None = None,
        block_ms: int = READER_BLOCK_MS,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.client = client
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self.reclaim_after = reclaim_after
        self.events_cap = events_cap
        self.block_ms = block_ms
        self.stopping = threading.Event()
        self._subscription: Subscription | None = None

    def handle(self, subscription: Subscription, events: list[Event]) -> None:
        """Deal with one batch (possibly empty) and ack what is done with."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop after the current read; what is not acknowledged stays pending."""
        self.stopping.set()
        if self._subscription is not None:
            self._subscription.close()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._subscription = Subscription(
                    self.client,
                    self.keys,
                    group=self.group,
                    consumer=self.consumer,
                    reclaim_after=self.reclaim_after,
                    events_cap=self.events_cap,
                    block_ms=self.block_ms,
                )
                while not self.stopping.is_set():
                    self.handle(self._subscription, self._subscription.read())
            except (redis.RedisError, OSError) as exc:
                log.warning(self.retry_event, error=type(exc).__name__, detail=str(exc)[:200])
                self.stopping.wait(RETRY_PAUSE)
