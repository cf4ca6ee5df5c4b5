"""Redis Cluster (issue 14, part 1) on a real three-master cluster the tests start: every key of
an account in one slot, the store's scripts routed to their node and batched per node, the
events relayed from the accounts' outboxes exactly once, and all of it through a live reshard."""

from __future__ import annotations

import inspect
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.cluster_topology import ClusterTopology, running_cluster
from tests.waiting import wait_until
from worker.connection import connect_redis, parse_cluster_url
from worker.doctor import check_cluster
from worker.errors import ConfigError
from worker.events import Subscription, ensure_group
from worker.keys import Keys
from worker.poll_start import PollStarter
from worker.polling.store import PlanStore
from worker.ratelimit import RateLimiter
from worker.relay import EventRelay
from worker.settings import load_settings
from worker.store import PaymentSpec, PaymentStore, State


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterTopology]:
    with running_cluster() as topology:
        yield topology


@pytest.fixture
def client(cluster: ClusterTopology) -> Iterator[redis.Redis]:
    c = connect_redis(cluster.url)
    yield c
    c.close()


@pytest.fixture
def keys() -> Keys:
    return Keys(f"cl-{uuid.uuid4().hex[:6]}", cluster=True)


def spec(account: str, ref: str) -> PaymentSpec:
    return PaymentSpec(account, ref, "10.00", "USD", "https://shop.example/done")


def accounts_on_every_master(cluster: ClusterTopology, keys: Keys, per_node: int = 2) -> list[str]:
    """Account names whose slots fall on each of the three masters, ``per_node`` each."""
    found: dict[int, list[str]] = {}
    i = 0
    while any(len(found.get(s.port, [])) < per_node for s in cluster.servers):
        name = f"acct{i}"
        port = cluster.owner_port(cluster.slot_of(keys.payment(name, "x")))
        if len(found.setdefault(port, [])) < per_node:
            found[port].append(name)
        i += 1
    return [name for names in found.values() for name in names]


def test_cluster_urls_are_parsed_and_checked() -> None:
    target = parse_cluster_url("redis+cluster://:s%40cret@10.0.0.1:7000,h2:7001")
    assert target.nodes == [("10.0.0.1", 7000), ("h2", 7001)]
    assert target.password == "s@cret" and not target.tls
    assert "s@cret" not in repr(target)
    assert parse_cluster_url("rediss+cluster://h:7000").tls
    for bad in ("redis+cluster://h", "redis+cluster://h:1/0", "redis+cluster://:pw@h:x"):
        with pytest.raises(ConfigError) as err:
            load_settings({"PAYPOLL_REDIS_URL": bad})
        assert str(err.value).startswith("PAYPOLL_REDIS_URL")
        assert "pw" not in str(err.value)
    settings = load_settings({"PAYPOLL_REDIS_URL": "redis+cluster://h:7000"})
    assert settings.redis_is_cluster and settings.keys().cluster
    assert not load_settings({"PAYPOLL_REDIS_URL": "redis://h:1/0"}).keys().cluster


def test_every_key_of_an_account_is_in_one_slot(client: redis.Redis, keys: Keys) -> None:
    cluster_client = client
    slots: dict[str, int] = {}
    for name, method in inspect.getmembers(keys, inspect.ismethod):
        params = list(inspect.signature(method).parameters)
        if name.startswith("_") or not params or params[0] != "account":
            continue
        args = {"account": "acme", "reference_id": "r1", "state": "pending", "step": "track"}
        key = method(**{p: args[p] for p in params if p in args})
        slots[name] = cluster_client.keyslot(key)  # type: ignore[attr-defined]
    assert {"payment", "due", "inflight", "limiter", "token", "event_outbox", "plan"} <= set(slots)
    assert len(set(slots.values())) == 1, slots
    assert keys.events_written("acme") == keys.event_outbox("acme")
    stream_slot = cluster_client.keyslot(keys.events())  # type: ignore[attr-defined]
    assert stream_slot == cluster_client.keyslot(keys.events_relayed())  # type: ignore[attr-defined]
    # On one Redis nothing changes: the scripts write the stream itself, under its old name.
    single = Keys(keys.prefix)
    assert single.events() == f"{keys.prefix}:events" == single.events_written("acme")


def test_store_scripts_run_per_node_and_events_are_relayed_once(
    cluster: ClusterTopology, client: redis.Redis, keys: Keys
) -> None:
    store = PaymentStore(redis=client, keys=keys)
    accounts = accounts_on_every_master(cluster, keys)
    ensure_group(client, keys, "audit", start="0")
    assert store.submit_many([spec(a, f"r{i}") for a in accounts for i in range(3)]) == [True] * (
        3 * len(accounts)
    )
    assert store.submit(spec(accounts[0], "r0")) is False  # idempotent across the batch path
    assert store.register_tracking(accounts[1], "ext-1", "pay_ext_1") is True
    assert store.accounts() == sorted(accounts)

    claims = store.claim_due_many({a: 10 for a in accounts}, lease=30, batch=10)
    assert {a: sorted(c.creates) for a, c in claims.items()} == {
        a: ["r0", "r1", "r2"] for a in accounts
    }
    assert claims[accounts[1]].tracks == ["ext-1"]
    # The outbox holds the account's events; the claim says how many, for the relay.
    assert {a: c.outbox for a, c in claims.items()} == {
        a: 4 if a == accounts[1] else 3 for a in accounts
    }
    for a in accounts:
        assert store.transition(a, "r0", State.CREATING).moved

    relay = EventRelay(client, keys)
    relayed = {a: relay.relay(a) for a in accounts}
    assert relayed == {a: 5 if a == accounts[1] else 4 for a in accounts}
    assert {a: relay.relay(a) for a in accounts} == {a: 0 for a in accounts}
    assert all(client.xlen(keys.event_outbox(a)) == 0 for a in accounts)

    sub = Subscription(client, keys, group="audit", consumer="c1", start="0")
    events = sub.read()
    assert len(events) == sum(relayed.values())
    for a in accounts:
        states = [(e.reference_id, e.state) for e in events if e.account == a]
        assert states[-1] == ("r0", "creating")  # per account, in the order they happened
        assert ("r0", "queued") in states[:-1]

    # The planner's per-account script batch and the limiter run on the cluster too.
    inputs = PlanStore(redis=client, keys=keys).read_inputs(accounts)
    assert set(inputs) == set(accounts)
    assert {a: sum(i.counts) for a, i in inputs.items()} == {
        a: 1 if a == accounts[1] else 0 for a in accounts
    }
    limiter = RateLimiter(redis=client, keys=keys, margin=0.0)
    started = time.monotonic()
    for _ in range(6):
        limiter.acquire(accounts[0], 20.0)
    assert time.monotonic() - started >= 5 * 0.05 * 0.9  # paced: six slots 50 ms apart
    assert client.exists(keys.limiter(accounts[0]))


def test_a_relay_that_died_before_deleting_the_outbox_appends_nothing_twice(
    client: redis.Redis, keys: Keys
) -> None:
    store = PaymentStore(redis=client, keys=keys)
    store.submit_many([spec("acme", f"r{i}") for i in range(4)])
    relay = EventRelay(client, keys)
    # The first half of a relay: appended and the cursor moved, but the outbox not yet trimmed.
    entries = client.xrange(keys.event_outbox("acme"), count=2)
    args: list[object] = ["acme", 1000]
    for entry_id, fields in entries:  # type: ignore[union-attr]
        args += [entry_id, len(fields)]
        for name, value in fields.items():
            args += [name, value]
    assert relay._relay(keys=[keys.events(), keys.events_relayed()], args=args) == 2
    assert relay.relay("acme") == 2  # only the two it had not relayed
    refs = [f[b"reference_id"] for _, f in client.xrange(keys.events())]  # type: ignore[union-attr]
    assert refs == [b"r0", b"r1", b"r2", b"r3"]


def test_the_store_keeps_working_through_a_live_reshard(
    cluster: ClusterTopology, client: redis.Redis, keys: Keys
) -> None:
    """A producer and a sweeper-like loop work on one account while its slot moves to another
    master a few keys at a time: nothing fails, nothing is lost, every event is relayed once."""
    store = PaymentStore(redis=client, keys=keys)
    relay = EventRelay(client, keys)
    account = "moving"
    slot = cluster.slot_of(keys.payment(account, "x"))
    source = cluster.owner_port(slot)
    store.submit_many([spec(account, f"pre{i}") for i in range(60)])  # keys for the move to carry
    done = threading.Event()
    errors: list[BaseException] = []
    progress = {"submitted": 0, "created": 0, "relayed": 0}

    def work() -> None:
        try:
            i = 0
            while not done.is_set() or i < 40:
                store.submit(spec(account, f"live{i}"))
                progress["submitted"] += 1
                claim = store.claim_due_many({account: 50}, lease=30, batch=20)[account]
                for ref in claim.creates:
                    if store.transition(account, ref, State.CREATING).moved:
                        progress["created"] += 1
                progress["relayed"] += relay.relay(account)
                i += 1
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    wait_until(lambda: progress["submitted"] >= 5, timeout=20, what="work before the move")
    before = dict(progress)
    target = cluster.move_slot(slot, batch=3, pause=0.02)
    during = dict(progress)
    done.set()
    worker.join(60)
    assert not errors, errors
    assert target != source and cluster.owner_port(slot) == target
    assert during["submitted"] > before["submitted"], "the work ran while the slot moved"
    # Drain: everything submitted gets claimed and created once; every event relayed once.
    while True:
        claim = store.claim_due_many({account: 100}, lease=30, batch=100)[account]
        if not claim.creates:
            break
        for ref in claim.creates:
            if store.transition(account, ref, State.CREATING).moved:
                progress["created"] += 1
    progress["relayed"] += relay.relay(account, batch=10_000)
    total = 60 + progress["submitted"]
    assert progress["created"] == total
    assert len(client.smembers(keys.by_state(account, State.CREATING))) == total  # type: ignore[arg-type]
    events = client.xrange(keys.events())
    assert progress["relayed"] == len(events) == 2 * total  # queued + creating, each once
    seen = [(f[b"reference_id"], f[b"to"]) for _, f in events]  # type: ignore[union-attr]
    assert len(set(seen)) == len(seen)


def test_doctor_checks_every_master_of_the_cluster(
    cluster: ClusterTopology, client: redis.Redis
) -> None:
    finding = check_cluster(client)
    assert finding.status == "warn", finding
    assert finding.message.startswith("3 masters, 16384 of 16384 slots served, cluster_state ok")
    assert "AOF on 0 of 3" in finding.message
    try:
        for server in cluster.servers:
            cluster.node(server.port).config_set("appendonly", "yes")
        assert check_cluster(client).status == "ok"
    finally:
        for server in cluster.servers:
            cluster.node(server.port).config_set("appendonly", "no")


def test_a_polls_start_and_its_slot_run_in_one_script_on_every_master(
    cluster: ClusterTopology, client: redis.Redis, keys: Keys
) -> None:
    store = PaymentStore(redis=client, keys=keys)
    limiter = RateLimiter(redis=client, keys=keys)
    polls = PollStarter(redis_client=client, keys=keys, limiter=limiter)
    accounts = accounts_on_every_master(cluster, keys, per_node=1)
    for a in accounts:
        assert store.register_tracking(a, "t1", f"pay_{a}")
    claims = store.claim_due_many({a: 10 for a in accounts}, lease=30, batch=10)
    assert {a: c.tracks for a, c in claims.items()} == {a: ["t1"] for a in accounts}
    for a in accounts:
        started = polls.start(a, "t1", owner="w1", lease=30, rate=5, max_wait=1.0)
        assert started.record is not None and started.record.payment_id == f"pay_{a}"
        assert started.slot is not None  # booked on the account's own node
        assert client.exists(keys.limiter(a))
        assert client.hget(keys.owners(a), "track:t1") == b"w1"
