"""Store gauges read from a real Redis at scrape time, with queues filled by dramatiq itself."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from prometheus_client import CollectorRegistry, generate_latest

from tests.prometheus_server import value
from tests.redis_server import free_port
from worker.collectors import AccountLimitsCollector, StoreCollector, read_store
from worker.keys import Keys
from worker.settings import Account, Secret

QUEUES = ("paypoll-create", "paypoll-track")


def redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def populate_store(client: redis.Redis, keys: Keys, now: float) -> None:
    """Write the store's layout as worker/store writes it: two accounts with known contents."""
    client.sadd(keys.accounts(), "acme", "globex")
    client.sadd(keys.by_state("acme", "queued"), "r1", "r2")
    client.sadd(keys.by_state("acme", "pending"), "r3", "r4", "r5")
    client.sadd(keys.by_state("acme", "create_unknown"), "r6")
    client.sadd(keys.by_state("acme", "paid"), "r7")  # terminal: not a gauge
    client.sadd(keys.by_state("globex", "creating"), "g1")
    client.zadd(keys.due("acme", "create"), {"r1": now - 30.0, "r2": now + 5.0})
    client.zadd(keys.due("acme", "track"), {"r3": now - 2.0, "r4": now + 60.0})
    client.zadd(keys.inflight("acme", "track"), {"r5": now - 1.0})  # lease expired
    client.zadd(keys.inflight("globex", "create"), {"g1": now + 30.0})
    client.zadd(keys.heartbeat(), {"host-a:11": now - 1.0, "host-a:12": now - 4.0})
    client.zadd(keys.heartbeat(), {"host-b:99": now - 120.0})  # stale: a dead process


def fill_queues(redis_url: str, namespace: str) -> RedisBroker:
    """Through dramatiq: 3 creates enqueued, one fetched and nacked, one fetched (unacked);
    2 tracks delayed."""
    broker = RedisBroker(url=redis_url, namespace=namespace, middleware=[])
    for queue in QUEUES:
        broker.declare_queue(queue)
    for i in range(3):
        broker.enqueue(dramatiq.Message("paypoll-create", "create", (i,), {}, {}))
    for i in range(2):
        broker.enqueue(dramatiq.Message("paypoll-track", "track", (i,), {}, {}), delay=60_000)
    consumer = broker.consume("paypoll-create", prefetch=1, timeout=1000)
    nacked = next(consumer)
    consumer.nack(nacked)
    held = next(consumer)
    assert held is not None
    assert nacked is not None
    return broker


@pytest.fixture
def namespace(key_prefix: str) -> str:
    return f"{key_prefix}-dq"  # under the test's prefix, so the fixture deletes it


@pytest.fixture
def broker(redis_url: str, namespace: str) -> Iterator[RedisBroker]:
    broker = fill_queues(redis_url, namespace)
    yield broker
    broker.close()


def test_read_store_reads_the_layout(
    redis_client: redis.Redis, keys: Keys, namespace: str, broker: RedisBroker
) -> None:
    now = redis_now(redis_client)
    populate_store(redis_client, keys, now)

    snap = read_store(redis_client, keys, namespace, QUEUES)

    assert abs(snap.now - now) < 5
    assert snap.payments[("acme", "queued")] == 2
    assert snap.payments[("acme", "pending")] == 3
    assert snap.payments[("acme", "create_unknown")] == 1
    assert snap.payments[("globex", "creating")] == 1
    assert snap.payments[("globex", "failed")] == 0
    assert ("acme", "paid") not in snap.payments
    create, track = snap.steps[("acme", "create")], snap.steps[("acme", "track")]
    assert (create.scheduled, create.overdue) == (2, 1)
    assert create.overdue_seconds == pytest.approx(30.0, abs=1.0)
    assert (track.scheduled, track.overdue, track.inflight, track.lease_expired) == (2, 1, 1, 1)
    assert track.overdue_seconds == pytest.approx(2.0, abs=1.0)
    globex = snap.steps[("globex", "create")]
    assert (globex.scheduled, globex.overdue_seconds, globex.inflight) == (0, 0.0, 1)
    assert globex.lease_expired == 0
    assert snap.workers_alive == 2
    assert snap.workers_registered == 3
    created, tracked = snap.queues["paypoll-create"], snap.queues["paypoll-track"]
    assert (created.ready, created.unacked, created.dead) == (1, 2, 1)
    assert (tracked.ready, tracked.delayed) == (0, 2)


def test_collector_exposition(
    redis_client: redis.Redis, keys: Keys, namespace: str, broker: RedisBroker
) -> None:
    populate_store(redis_client, keys, redis_now(redis_client))
    registry = CollectorRegistry()
    registry.register(
        StoreCollector(redis=redis_client, keys=keys, namespace=namespace, queues=QUEUES)
    )
    registry.register(
        AccountLimitsCollector.from_accounts(
            [Account("acme", "client-id-1", Secret("hunter2-secret"), rate=5.0)]
        )
    )
    text = generate_latest(registry).decode()

    assert value(text, "paypoll_redis_up") == 1
    assert value(text, "paypoll_payments", account="acme", state="pending") == 3
    assert value(text, "paypoll_steps_overdue", account="acme", step="create") == 1
    assert value(text, "paypoll_steps_lease_expired", account="acme", step="track") == 1
    overdue = value(text, "paypoll_step_overdue_seconds", account="acme", step="create")
    assert overdue is not None
    assert 29 < overdue < 31
    assert value(text, "paypoll_queue_depth", queue="paypoll-create") == 1
    assert value(text, "paypoll_queue_messages", queue="paypoll-create") == 2
    assert value(text, "paypoll_queue_dead_messages", queue="paypoll-create") == 1
    assert value(text, "paypoll_queue_delayed_messages", queue="paypoll-track") == 2
    assert value(text, "paypoll_workers_alive") == 2
    assert value(text, "paypoll_account_rate_limit", account="acme") == 5.0
    assert "hunter2" not in text
    assert "r1" not in text  # no reference as a label


def test_redis_down_yields_redis_up_zero_and_never_raises(keys: Keys) -> None:
    collector = StoreCollector.from_url(
        f"redis://:pw@127.0.0.1:{free_port()}/0", keys=keys, namespace="ns", queues=QUEUES
    )
    registry = CollectorRegistry()
    registry.register(collector)
    started = time.monotonic()
    text = generate_latest(registry).decode()
    took = time.monotonic() - started
    assert value(text, "paypoll_redis_up") == 0
    assert "paypoll_payments" not in text
    assert took < 1.5, f"a scrape with Redis down took {took:.2f}s"


def test_fifty_accounts_read_in_two_pipelines_of_known_size(
    redis_client: redis.Redis, keys: Keys, namespace: str
) -> None:
    now = redis_now(redis_client)
    for n in range(50):
        redis_client.sadd(keys.accounts(), f"acct{n}")
        redis_client.sadd(keys.by_state(f"acct{n}", "pending"), *[f"r{i}" for i in range(100)])
        redis_client.zadd(keys.due(f"acct{n}", "track"), {f"r{i}": now + i for i in range(100)})
    before = int(redis_client.info("stats")["total_commands_processed"])
    snap = read_store(redis_client, keys, namespace, QUEUES)
    commands = int(redis_client.info("stats")["total_commands_processed"]) - before
    assert len({a for a, _ in snap.payments}) == 50
    assert all(snap.payments[(f"acct{n}", "pending")] == 100 for n in range(50))
    # 2 + 4 per queue, then 2 + (5 states + 5 per step x 2 steps) per account, + the INFO itself.
    assert commands == (2 + 4 * len(QUEUES)) + (2 + 15 * 50) + 1


def test_a_hung_redis_costs_the_scrape_one_timeout(keys: Keys) -> None:
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        collector = StoreCollector.from_url(
            f"redis://127.0.0.1:{port}/0", keys=keys, namespace="ns", queues=QUEUES, timeout=0.3
        )
        started = time.monotonic()
        families = list(collector.collect())
        took = time.monotonic() - started
    assert [(f.name, f.samples[0].value) for f in families] == [("paypoll_redis_up", 0)]
    assert took < 1.0, f"a scrape with Redis hung took {took:.2f}s"


def test_queues_on_another_redis_are_read_there(
    redis_url: str, redis_client: redis.Redis, keys: Keys, namespace: str
) -> None:
    """PAYPOLL_BROKER_URL=redis://... (issue 14): the store in one Redis database, the queues
    in another; the gauges read each where it is."""
    jobs_url = redis_url.rsplit("/", 1)[0] + "/1"
    jobs = fill_queues(jobs_url, namespace)
    try:
        registry = CollectorRegistry()
        registry.register(
            StoreCollector.from_url(
                redis_url, keys=keys, namespace=namespace, queues=QUEUES, broker_url=jobs_url
            )
        )
        text = generate_latest(registry).decode()
        assert value(text, "paypoll_broker_up") == 1
        assert value(text, "paypoll_queue_depth", queue="paypoll-create") == 1
        assert value(text, "paypoll_queue_messages", queue="paypoll-create") == 2
        assert value(text, "paypoll_queue_delayed_messages", queue="paypoll-track") == 2
        # Read from the store's Redis instead, the queues are empty: they are not there.
        alone = read_store(redis_client, keys, namespace, QUEUES)
        assert alone.queues["paypoll-create"].ready == 0
    finally:
        jobs.close()
        other = redis.Redis.from_url(jobs_url)
        for key in other.scan_iter(match=f"{namespace}*"):
            other.delete(key)
        other.close()
