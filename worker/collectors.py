"""Gauges of shared state, read from Redis when Prometheus scrapes (not kept in any process).

Backlog by state, the most overdue scheduled step, queue depths and live workers are facts about
Redis, not about one process: counting them in every worker and summing would double count, and a
multiprocess gauge of a dead process would linger. So the fleet's exporter reads them once per
scrape with :class:`StoreCollector`. The whole Redis layout it reads is in :func:`read_store`,
so a change of layout is a change of one function.

:class:`AccountLimitsCollector` exposes each account's configured rate limit, so a dashboard can
draw the request rate against it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker import defaults
from worker.connection import connect_redis
from worker.errors import PaypollError
from worker.events import GroupLag, group_lags
from worker.keys import Keys
from worker.polling.gauges import planner_families, read_planner
from worker.settings import Account

log = logging.getLogger(__name__)

# The states shown as backlog: not terminal yet ...
BACKLOG_STATES = ("queued", "creating", "pending")
# ... and the states that wait for an operator ("needs attention").
ATTENTION_STATES = ("create_unknown", "failed")
GAUGE_STATES = BACKLOG_STATES + ATTENTION_STATES
# The steps an active payment is scheduled for, each with its own due and inflight sets.
STEPS = ("create", "track")
# A worker whose last heartbeat is older than this is not counted alive: the sweeper thread of
# each process beats every 2 s (worker/sweeper.py), so this is several missed beats in a row, not
# one late beat under load.
HEARTBEAT_STALE_AFTER = 15.0
# Seconds a scrape waits for Redis (connect, then each reply): well under the 4 s scrape timeout
# of config/prometheus.yml, so a scrape with Redis down still answers (paypoll_redis_up 0).
SCRAPE_REDIS_TIMEOUT = 1.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class QueueDepth:
    """What the broker holds for one queue (see :func:`read_store` and
    :func:`broker_queue_reader`)."""

    ready: int  # messages waiting, not fetched by any worker yet
    # messages enqueued and not acknowledged: ready + held or run by workers (None: the broker
    # does not say; RabbitMQ tells it only through its management plugin)
    unacked: int | None
    delayed: int  # delayed messages (retries, backoffs) not yet moved to the queue
    dead: int  # dead-lettered messages


QueueReader = Callable[[Sequence[str]], dict[str, QueueDepth]]
"""Reads the depths of queues kept apart from the store (``PAYPOLL_BROKER_URL``); raises
redis.RedisError or a PaypollError (RabbitMQ's BrokerUnavailable) when it cannot."""


@dataclass(frozen=True)
class StepSchedule:
    """One account's schedule of one step (create or track)."""

    scheduled: int  # payments waiting for this step's due time
    overdue: int  # of those, the ones whose due time has passed
    overdue_seconds: float  # how late the most overdue one is (0 when none)
    inflight: int  # dispatched to the workers, under a lease
    lease_expired: int  # dispatched, lease passed without an answer (the sweeper re-dispatches)


@dataclass(frozen=True)
class StoreSnapshot:
    """One consistent-enough reading of the store: every value from the same two round trips."""

    now: float  # Redis clock, seconds
    payments: dict[tuple[str, str], int] = field(default_factory=dict)  # (account, state) -> n
    steps: dict[tuple[str, str], StepSchedule] = field(default_factory=dict)  # (account, step)
    queues: dict[str, QueueDepth] = field(default_factory=dict)
    workers_alive: int = 0
    workers_registered: int = 0


def read_store(
    client: redis.Redis,
    keys: Keys,
    namespace: str,
    queues: Sequence[str],
    *,
    accounts: Iterable[str] = (),
    heartbeat_stale_after: float = HEARTBEAT_STALE_AFTER,
) -> StoreSnapshot:
    """Read everything the gauges show, in three round trips (two pipelined) whatever the account
    count.

    Layout read (the store's, written by worker/store.py, and dramatiq 2.2.1's Redis broker):

    - ``keys.accounts()``: SET of account aliases; per account, ``keys.by_state(account, s)``:
      SET of reference_ids in state ``s``; per account and step (create, track)
      ``keys.due(account, step)``: ZSET reference_id -> when the step is due, and
      ``keys.inflight(account, step)``: ZSET reference_id -> lease deadline of a dispatched step
      (both on the Redis clock, seconds).
    - ``keys.heartbeat()``: ZSET "host:pid" -> last heartbeat (Redis clock, seconds).
    - dramatiq (brokers/redis.py, redis/dispatch.lua): ``{ns}:{queue}`` LIST of ready message
      ids, ``{ns}:{queue}.msgs`` HASH of every message not acked yet (fetched ones included);
      delayed messages in ``{ns}:{queue}.DQ.msgs`` (their list ``.DQ`` loses the ids workers
      prefetch into memory, the hash keeps them); dead letters in the ZSET ``{ns}:{queue}.XQ``.

    ``accounts`` (the configured ones) are read as well as those in ``keys.accounts()``, so
    their gauges exist, at 0, before their first payment (issue 15: a fresh fleet's panels).

    Raises redis.RedisError when Redis fails; the collector turns that into ``paypoll_redis_up 0``.
    """
    # TIME on its own: redis-py refuses it in a Redis Cluster pipeline (it names no key).
    seconds, micros = client.time()
    now = int(seconds) + int(micros) / 1e6
    first = client.pipeline(transaction=False)
    first.smembers(keys.accounts())
    _queue_commands(first, namespace, queues)
    replies: list[Any] = [None, *first.execute()]
    known = sorted({_text(a) for a in replies[1]} | set(accounts))
    depths = _queue_depths(replies[2:], queues)

    second = client.pipeline(transaction=False)
    second.zcount(keys.heartbeat(), now - heartbeat_stale_after, "+inf")
    second.zcard(keys.heartbeat())
    for account in known:
        for state in GAUGE_STATES:
            second.scard(keys.by_state(account, state))
        for step in STEPS:
            due, inflight = keys.due(account, step), keys.inflight(account, step)
            second.zcard(due)
            second.zcount(due, "-inf", now)
            second.zrange(due, 0, 0, withscores=True)
            second.zcard(inflight)
            second.zcount(inflight, "-inf", now)
    replies = second.execute()
    snapshot = StoreSnapshot(
        now=now,
        queues=depths,
        workers_alive=int(replies[0]),
        workers_registered=int(replies[1]),
    )
    at = 2
    for account in known:
        for state in GAUGE_STATES:
            snapshot.payments[(account, state)] = int(replies[at])
            at += 1
        for step in STEPS:
            scheduled, overdue, earliest, inflight, expired = replies[at : at + 5]
            at += 5
            lateness = now - float(earliest[0][1]) if earliest else 0.0
            snapshot.steps[(account, step)] = StepSchedule(
                scheduled=int(scheduled),
                overdue=int(overdue),
                overdue_seconds=max(0.0, lateness),
                inflight=int(inflight),
                lease_expired=int(expired),
            )
    return snapshot


def _queue_commands(pipe: Any, namespace: str, queues: Sequence[str]) -> None:
    # dramatiq 2.2.1's Redis broker layout: see read_store.
    for queue in queues:
        base = f"{namespace}:{queue}"
        pipe.llen(base)
        pipe.hlen(f"{base}.msgs")
        pipe.hlen(f"{base}.DQ.msgs")
        pipe.zcard(f"{base}.XQ")


def _queue_depths(replies: Sequence[Any], queues: Sequence[str]) -> dict[str, QueueDepth]:
    depths: dict[str, QueueDepth] = {}
    for i, queue in enumerate(queues):
        ready, unacked, delayed, dead = replies[4 * i : 4 * i + 4]
        depths[queue] = QueueDepth(int(ready), int(unacked), int(delayed), int(dead))
    return depths


def broker_queue_reader(
    broker_url: str, namespace: str, *, timeout: float = SCRAPE_REDIS_TIMEOUT
) -> QueueReader | None:
    """How to read the queues of ``broker_url`` (``PAYPOLL_BROKER_URL``), or None when it is
    empty: the queues are then on the store's Redis and :func:`read_store` reads them.

    RabbitMQ (amqp://): passive declares over one short connection per read
    (worker/rabbitmq.py ``read_queues``: ready, delay and dead-letter counts; ``unacked`` is
    None). Another Redis: dramatiq's layout there, as :func:`read_store` reads it. ``timeout``
    bounds each connect and answer, no retries."""
    if not broker_url:
        return None
    if broker_url.startswith(("amqp://", "amqps://")):

        def read_rabbitmq(queues: Sequence[str]) -> dict[str, QueueDepth]:
            from worker.rabbitmq import read_queues

            counts = read_queues(broker_url, queues, timeout=timeout)
            return {
                queue: QueueDepth(ready=c.ready, unacked=None, delayed=c.delayed, dead=c.dead)
                for queue, c in counts.items()
            }

        return read_rabbitmq
    client = connect_redis(
        broker_url, socket_timeout=timeout, connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )

    def read_redis(queues: Sequence[str]) -> dict[str, QueueDepth]:
        pipe = client.pipeline(transaction=False)
        _queue_commands(pipe, namespace, queues)
        return _queue_depths(pipe.execute(), queues)

    return read_redis


class StoreCollector(Collector):
    """A prometheus-client collector of the store's gauges, read at each scrape.

    Never raises out of a scrape: when Redis cannot be read it yields ``paypoll_redis_up 0`` and
    nothing else, so the exporter still serves the counters of the workers. Build it with
    :meth:`from_url` (short timeouts, no retries) so a hung or absent Redis cannot stall a scrape.
    """

    def __init__(
        self,
        *,
        redis: redis.Redis,
        keys: Keys,
        namespace: str,
        queues: Sequence[str],
        accounts: Iterable[str] = (),
        heartbeat_stale_after: float = HEARTBEAT_STALE_AFTER,
        events_cap: int = defaults.EVENTS_MAXLEN,
        webhook_endpoints: Iterable[str] = (),
        queue_reader: QueueReader | None = None,
    ) -> None:
        self._redis = redis
        self._queue_reader = queue_reader
        self._events_cap = events_cap
        self._webhook_endpoints = tuple(webhook_endpoints)
        self._accounts = tuple(accounts)
        self._keys = keys
        self._namespace = namespace
        self._queues = tuple(queues)
        self._stale_after = heartbeat_stale_after

    @classmethod
    def from_url(
        cls,
        redis_url: str,
        *,
        keys: Keys,
        namespace: str,
        queues: Sequence[str],
        accounts: Iterable[str] = (),
        timeout: float = SCRAPE_REDIS_TIMEOUT,
        heartbeat_stale_after: float = HEARTBEAT_STALE_AFTER,
        events_cap: int = defaults.EVENTS_MAXLEN,
        webhook_endpoints: Iterable[str] = (),
        broker_url: str = "",
    ) -> StoreCollector:
        """A collector with its own client: ``timeout`` per socket operation and no retries;
        the queues read from ``broker_url`` when it is set (:func:`broker_queue_reader`).

        redis-py's default client retries a failed connection 10 times with backoff, which
        stretches a scrape with Redis down past Prometheus's scrape timeout; this one answers
        ``paypoll_redis_up 0`` within about ``timeout``. Opens no connection until a scrape.
        """
        client = connect_redis(
            redis_url, socket_timeout=timeout, connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        return cls(
            redis=client,
            keys=keys,
            namespace=namespace,
            queues=queues,
            accounts=accounts,
            heartbeat_stale_after=heartbeat_stale_after,
            events_cap=events_cap,
            webhook_endpoints=webhook_endpoints,
            queue_reader=broker_queue_reader(broker_url, namespace, timeout=timeout),
        )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Names are not registered up front: the collector must not touch Redis at registration.
        return []

    def collect(self) -> Iterable[Metric]:
        """Yield the store's gauges, or ``paypoll_redis_up 0`` when Redis fails."""
        started = time.perf_counter()
        up = GaugeMetricFamily(
            "paypoll_redis_up", "1 if the exporter read the store from Redis at this scrape"
        )
        try:
            snapshot = read_store(
                self._redis,
                self._keys,
                self._namespace,
                # Queues kept apart (PAYPOLL_BROKER_URL) are read below, from their broker.
                () if self._queue_reader else self._queues,
                accounts=self._accounts,
                heartbeat_stale_after=self._stale_after,
            )
        except redis.RedisError as exc:
            # The exception's text names the host and the error, never a password.
            log.warning("metrics: cannot read the store from Redis: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        accounts = sorted({account for account, _ in snapshot.payments})
        try:
            planner = read_planner(self._redis, self._keys, accounts, snapshot.now)
            events = read_events(self._redis, self._keys)
            webhooks = read_webhooks(self._redis, self._keys, self._webhook_endpoints, snapshot.now)
        except redis.RedisError as exc:
            log.warning("metrics: cannot read the planner from Redis: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        broker_up = GaugeMetricFamily(
            "paypoll_broker_up",
            "1 if the exporter read the job queues from their broker (Redis or RabbitMQ)",
        )
        queues_read = True
        if self._queue_reader is not None:
            try:
                snapshot = replace(snapshot, queues=self._queue_reader(self._queues))
            except (redis.RedisError, PaypollError) as exc:
                # BrokerUnavailable's text masks the password; redis-py's names no password.
                log.warning("metrics: cannot read the job queues: %s", exc)
                queues_read = False
        broker_up.add_metric([], 1 if queues_read else 0)
        yield broker_up
        yield from self._families(snapshot)
        yield from planner_families(planner)
        yield from self._event_families(events)
        yield from _webhook_families(webhooks)
        took = GaugeMetricFamily(
            "paypoll_store_scrape_seconds", "Time the exporter took to read the store from Redis"
        )
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _families(self, snap: StoreSnapshot) -> Iterator[GaugeMetricFamily]:
        payments = GaugeMetricFamily(
            "paypoll_payments",
            "Payments now in each non-terminal or needs-attention state, by account",
            labels=["account", "state"],
        )
        for (account, state), count in sorted(snap.payments.items()):
            payments.add_metric([account, state], count)
        yield payments

        schedule = {
            "scheduled": GaugeMetricFamily(
                "paypoll_steps_scheduled",
                "Payments waiting for the due time of their next step, by account and step",
                labels=["account", "step"],
            ),
            "overdue": GaugeMetricFamily(
                "paypoll_steps_overdue",
                "Scheduled steps whose due time has passed, not dispatched yet",
                labels=["account", "step"],
            ),
            "overdue_seconds": GaugeMetricFamily(
                "paypoll_step_overdue_seconds",
                "How late the most overdue scheduled step is (0 when none is late)",
                labels=["account", "step"],
            ),
            "inflight": GaugeMetricFamily(
                "paypoll_steps_inflight",
                "Steps dispatched to the workers and not finished, by account and step",
                labels=["account", "step"],
            ),
            "lease_expired": GaugeMetricFamily(
                "paypoll_steps_lease_expired",
                "Dispatched steps whose lease passed without an answer (to be re-dispatched)",
                labels=["account", "step"],
            ),
        }
        for (account, step), sched in sorted(snap.steps.items()):
            for attr, family in schedule.items():
                family.add_metric([account, step], getattr(sched, attr))
        yield from schedule.values()

        families = {
            "ready": GaugeMetricFamily(
                "paypoll_queue_depth",
                "Messages waiting in a dramatiq queue, not fetched by any worker yet",
                labels=["queue"],
            ),
            "unacked": GaugeMetricFamily(
                "paypoll_queue_messages",
                "Messages of a queue not acknowledged yet (waiting, prefetched or running)",
                labels=["queue"],
            ),
            "delayed": GaugeMetricFamily(
                "paypoll_queue_delayed_messages",
                "Delayed messages of a queue (its .DQ), prefetched ones included",
                labels=["queue"],
            ),
            "dead": GaugeMetricFamily(
                "paypoll_queue_dead_messages",
                "Dead-lettered messages of a queue (its .XQ)",
                labels=["queue"],
            ),
        }
        for queue, depth in snap.queues.items():
            for attr, family in families.items():
                if getattr(depth, attr) is not None:
                    family.add_metric([queue], getattr(depth, attr))
        yield from families.values()

        alive = GaugeMetricFamily(
            "paypoll_workers_alive",
            f"Worker processes whose heartbeat is newer than {self._stale_after:g} s",
        )
        alive.add_metric([], snap.workers_alive)
        yield alive
        registered = GaugeMetricFamily(
            "paypoll_workers_registered",
            "Worker processes in the heartbeat set, stale ones included",
        )
        registered.add_metric([], snap.workers_registered)
        yield registered

    def _event_families(self, events: EventsSnapshot) -> Iterator[GaugeMetricFamily]:
        length = GaugeMetricFamily(
            "paypoll_events_stream_length", "Entries in the events stream (trimmed at its cap)"
        )
        length.add_metric([], events.length)
        yield length
        cap = GaugeMetricFamily(
            "paypoll_events_stream_cap",
            "Approximate cap of the events stream (PAYPOLL_EVENTS_MAXLEN)",
        )
        cap.add_metric([], self._events_cap)
        yield cap
        lag = GaugeMetricFamily(
            "paypoll_events_group_lag",
            "Events a consumer group has not been delivered yet; at the cap they are trimmed",
            labels=["group"],
        )
        pending = GaugeMetricFamily(
            "paypoll_events_group_pending",
            "Events delivered to a consumer group's consumers and not acknowledged yet",
            labels=["group"],
        )
        consumers = GaugeMetricFamily(
            "paypoll_events_group_consumers",
            "Consumers known to a consumer group of the events stream",
            labels=["group"],
        )
        for group in events.groups:
            # Redis cannot count a lag across a gap (trimmed unread events): show all of it.
            lag.add_metric([group.group], events.length if group.lag is None else group.lag)
            pending.add_metric([group.group], group.pending)
            consumers.add_metric([group.group], group.consumers)
        yield from (lag, pending, consumers)


@dataclass(frozen=True)
class EventsSnapshot:
    """The events stream's length and its consumer groups."""

    length: int
    groups: list[GroupLag]


def read_events(client: redis.Redis, keys: Keys) -> EventsSnapshot:
    """The events stream's length and every consumer group's lag (two round trips)."""
    return EventsSnapshot(length=int(client.xlen(keys.events())), groups=group_lags(client, keys))


@dataclass(frozen=True)
class WebhookEndpointSnapshot:
    """One webhook endpoint's queue and state."""

    backlog: int
    oldest_seconds: float  # age of its oldest undelivered webhook's transition (0: none)
    dead_letters: int
    status: str


def read_webhooks(
    client: redis.Redis, keys: Keys, configured: Iterable[str], now: float
) -> dict[str, WebhookEndpointSnapshot]:
    """Every webhook endpoint (configured, or with webhooks routed to it): two round trips.

    Layout (worker/webhooks/queue.py): ``keys.webhook(e, "queue")`` stream of undelivered
    webhooks (field ``at``: the transition's time), ``keys.webhook(e, "dead")`` stream of dead
    letters, ``keys.webhook(e, "state")`` hash with ``status``."""
    names = sorted({_text(n) for n in client.smembers(keys.webhook_endpoints())} | set(configured))
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xlen(keys.webhook(name, "queue"))
        pipe.xrange(keys.webhook(name, "queue"), count=1)
        pipe.xlen(keys.webhook(name, "dead"))
        pipe.hget(keys.webhook(name, "state"), "status")
    replies: list[Any] = pipe.execute()
    found = {}
    for i, name in enumerate(names):
        backlog, first, dead, status = replies[4 * i : 4 * i + 4]
        oldest = 0.0
        if first:
            at = first[0][1].get(b"at") or first[0][1].get("at")
            oldest = max(0.0, now - float(at)) if at else 0.0
        found[name] = WebhookEndpointSnapshot(
            backlog=int(backlog),
            oldest_seconds=oldest,
            dead_letters=int(dead),
            status=_text(status) if status else "healthy",
        )
    return found


WEBHOOK_STATES = ("healthy", "failing", "disabled")


def _webhook_families(
    endpoints: Mapping[str, WebhookEndpointSnapshot],
) -> Iterator[GaugeMetricFamily]:
    backlog = GaugeMetricFamily(
        "paypoll_webhook_backlog",
        "Webhooks queued for an endpoint and not delivered yet",
        labels=["endpoint"],
    )
    oldest = GaugeMetricFamily(
        "paypoll_webhook_oldest_seconds",
        "Age of the oldest undelivered webhook of an endpoint (since its transition)",
        labels=["endpoint"],
    )
    dead = GaugeMetricFamily(
        "paypoll_webhook_dead_letters",
        "Dead-lettered webhooks of an endpoint (paypoll webhooks failed / replay)",
        labels=["endpoint"],
    )
    state = GaugeMetricFamily(
        "paypoll_webhook_endpoint_state",
        "1 for an endpoint's current state (healthy, failing, disabled), 0 for the others",
        labels=["endpoint", "state"],
    )
    for name, snap in sorted(endpoints.items()):
        backlog.add_metric([name], snap.backlog)
        oldest.add_metric([name], snap.oldest_seconds)
        dead.add_metric([name], snap.dead_letters)
        for value in WEBHOOK_STATES:
            state.add_metric([name, value], 1 if snap.status == value else 0)
    yield from (backlog, oldest, dead, state)


class AccountLimitsCollector(Collector):
    """``paypoll_account_rate_limit{account}``: each account's configured requests per second."""

    def __init__(self, rates: Mapping[str, float]) -> None:
        self._rates = dict(rates)

    @classmethod
    def from_accounts(cls, accounts: Iterable[Account]) -> AccountLimitsCollector:
        """The limits of configured accounts (``settings.accounts.values()``)."""
        return cls({account.name: account.rate for account in accounts})

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return list(self.collect())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """Yield the configured rate limits; reads nothing."""
        family = GaugeMetricFamily(
            "paypoll_account_rate_limit",
            "Configured rate limit of an account's API key, in requests per second",
            labels=["account"],
        )
        for name, rate in sorted(self._rates.items()):
            family.add_metric([name], rate)
        return [family]
