"""The events stream read through consumer groups (worker.events), and `paypoll events`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY

from tests.waiting import wait_until
from worker.collectors import StoreCollector
from worker.errors import ValidationError
from worker.events import Event, Subscription, group_lags
from worker.keys import Keys
from worker.store import PaymentSpec, PaymentStore, State


def _spec(ref: str, account: str = "acme") -> PaymentSpec:
    return PaymentSpec(account, ref, "10", "USD", "https://shop.test/ok")


@pytest.fixture
def store(redis_client: redis.Redis, keys: Keys) -> PaymentStore:
    return PaymentStore(redis=redis_client, keys=keys, events_maxlen=100_000)


def _pay(store: PaymentStore, ref: str, account: str = "acme") -> None:
    """queued -> creating -> pending -> paid: four events."""
    store.submit(_spec(ref, account))
    store.transition(account, ref, State.CREATING, next_step="create")
    store.transition(account, ref, State.PENDING, next_step="track")
    store.transition(account, ref, State.PAID)


def _read_all(sub: Subscription, count: int, timeout: float = 10.0) -> list[Event]:
    got: list[Event] = []

    def enough() -> bool:
        got.extend(sub.read())
        return len(got) >= count

    wait_until(enough, timeout=timeout, what=f"{count} events")
    return got


def test_a_group_sees_every_transition_once_acked_and_unacked_ones_again(
    store: PaymentStore, redis_client: redis.Redis, keys: Keys
) -> None:
    sub = Subscription(redis_client, keys, group="shop", consumer="c1", block_ms=100)
    for i in range(3):
        _pay(store, f"r{i}")
    events = _read_all(sub, 12)
    assert [(e.reference_id, e.state) for e in events[:4]] == [
        ("r0", "queued"),
        ("r0", "creating"),
        ("r0", "pending"),
        ("r0", "paid"),
    ]
    assert len({e.id for e in events}) == 12 and events[3].previous == "pending"
    # Ack half; the same consumer, back after a restart, gets the other half first.
    sub.ack(*events[:6])
    again = Subscription(redis_client, keys, group="shop", consumer="c1", block_ms=100)
    assert [e.id for e in again.read()] == [e.id for e in events[6:]]
    again.ack(*events[6:])
    assert again.read() == []
    [lag] = group_lags(redis_client, keys)
    assert (lag.group, lag.pending, lag.lag, lag.consumers) == ("shop", 0, 0, 1)


def test_a_group_created_now_starts_at_the_end_and_filters_accounts(
    store: PaymentStore, redis_client: redis.Redis, keys: Keys
) -> None:
    _pay(store, "before")
    sub = Subscription(
        redis_client, keys, group="acme-only", consumer="c", accounts=["acme"], block_ms=100
    )
    _pay(store, "other", account="zeta")
    _pay(store, "after")
    events = _read_all(sub, 4)
    assert {e.reference_id for e in events} == {"after"}
    sub.ack(*events)
    # The other account's events were acknowledged unseen: nothing is left pending.
    [lag] = group_lags(redis_client, keys)
    assert lag.pending == 0 and lag.lag == 0
    with pytest.raises(ValidationError) as err:
        Subscription(redis_client, keys, group="", consumer="c")
    assert err.value.field == "group"


_DOOMED = """
import sys, redis
from worker.events import Subscription
from worker.keys import Keys
client = redis.Redis.from_url(sys.argv[1])
sub = Subscription(client, Keys(sys.argv[2]), group="shop", consumer="doomed", block_ms=100)
seen = []
while len(seen) < int(sys.argv[3]):
    seen.extend(e.id for e in sub.read())
print(" ".join(seen), flush=True)
sys.stdin.read()  # holds its events unacknowledged until killed
"""


def test_a_dead_consumers_events_are_reclaimed_by_another(
    store: PaymentStore, redis_client: redis.Redis, keys: Keys, redis_url: str, tmp_path: Path
) -> None:
    Subscription(redis_client, keys, group="shop", consumer="setup")
    _pay(store, "r1")
    _pay(store, "r2")
    doomed = subprocess.Popen(
        [sys.executable, "-c", _DOOMED, redis_url, keys.prefix, "8"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    try:
        assert doomed.stdout is not None
        held = doomed.stdout.readline().split()
        assert len(held) == 8
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
        for pipe in (doomed.stdin, doomed.stdout):
            if pipe is not None:
                pipe.close()
    [lag] = group_lags(redis_client, keys)
    assert lag.pending == 8
    survivor = Subscription(
        redis_client, keys, group="shop", consumer="survivor", reclaim_after=0.3, block_ms=100
    )
    started = time.monotonic()
    reclaimed = _read_all(survivor, 8)
    assert [e.id for e in reclaimed] == held
    assert time.monotonic() - started < 5
    survivor.ack(*reclaimed)
    [lag] = group_lags(redis_client, keys)
    assert lag.pending == 0


def _trimmed(group: str) -> float:
    return REGISTRY.get_sample_value("paypoll_events_trimmed_unread_total", {"group": group}) or 0


def test_events_trimmed_before_a_group_read_them_are_counted_and_skipped(
    redis_client: redis.Redis, keys: Keys
) -> None:
    store = PaymentStore(redis=redis_client, keys=keys, events_maxlen=10)
    group = f"slow-{keys.prefix}"
    slow = Subscription(redis_client, keys, group=group, consumer="c", block_ms=100)
    for i in range(150):
        _pay(store, f"r{i}")  # 600 events into a stream capped at about 10
    length = redis_client.xlen(keys.events())
    assert length < 600
    before = _trimmed(group)
    events = _read_all(slow, length)
    # Exactly the trimmed ones are counted, and the rest delivered.
    assert _trimmed(group) - before == 600 - length
    assert len(events) == length
    slow.ack(*events)
    slow._next_lag_check = 0.0
    slow.read()
    assert _trimmed(group) - before == 600 - length  # reported once


def test_the_collector_shows_each_groups_lag_against_the_cap(
    store: PaymentStore, redis_client: redis.Redis, keys: Keys
) -> None:
    sub = Subscription(redis_client, keys, group="shop", consumer="c", block_ms=100)
    _pay(store, "r1")
    _pay(store, "r2")
    first = sub.read()
    assert len(first) == 8
    sub.ack(*first[:3])
    _pay(store, "r3")
    collector = StoreCollector(
        redis=redis_client, keys=keys, namespace="ns", queues=(), events_cap=100_000
    )
    samples = {
        (s.name, s.labels.get("group", "")): s.value
        for family in collector.collect()
        for s in family.samples
        if s.name.startswith("paypoll_events")
    }
    assert samples[("paypoll_events_group_lag", "shop")] == 4
    assert samples[("paypoll_events_group_pending", "shop")] == 5
    assert samples[("paypoll_events_group_consumers", "shop")] == 1
    assert samples[("paypoll_events_stream_length", "")] == 12
    assert samples[("paypoll_events_stream_cap", "")] == 100_000


def _paypoll(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "events", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_paypoll_events_prints_past_and_following_events(
    store: PaymentStore, redis_client: redis.Redis, keys: Keys, redis_url: str
) -> None:
    env = {**os.environ, "PAYPOLL_REDIS_URL": redis_url, "PAYPOLL_KEY_PREFIX": keys.prefix}
    _pay(store, "r1")
    _pay(store, "z1", account="zeta")
    shown = _paypoll(env, "--json", "--account", "acme")
    assert shown.returncode == 0, shown.stderr
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [(e["reference_id"], e["from"], e["state"]) for e in lines] == [
        ("r1", "", "queued"),
        ("r1", "queued", "creating"),
        ("r1", "creating", "pending"),
        ("r1", "pending", "paid"),
    ]
    after = _paypoll(env, "--since", lines[1]["id"], "--account", "acme")
    assert after.returncode == 0 and len(after.stdout.splitlines()) == 2
    assert "acme/r1  creating -> pending" in after.stdout
    last = _paypoll(env, "--last", "2")
    assert [line.split()[2] for line in last.stdout.splitlines()] == ["zeta/z1", "zeta/z1"]
    bad = _paypoll(env, "--since", "yesterday")
    assert bad.returncode == 1 and "--since" in bad.stderr and "yesterday" in bad.stderr

    follow = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "events", "--follow", "--last", "0", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The follower resolves "now" when it starts: wait until it blocks reading.
        wait_until(
            lambda: any(c.get("cmd") == "xread" for c in redis_client.client_list()),
            timeout=15,
            what="the follower blocking on XREAD",
        )
        _pay(store, "r2")
        assert follow.stdout is not None
        got = [json.loads(follow.stdout.readline()) for _ in range(4)]
        assert [(e["reference_id"], e["state"]) for e in got] == [
            ("r2", "queued"),
            ("r2", "creating"),
            ("r2", "pending"),
            ("r2", "paid"),
        ]
    finally:
        follow.send_signal(signal.SIGTERM)
        status = follow.wait(timeout=10)
        for pipe in (follow.stdout, follow.stderr):
            if pipe is not None:
                pipe.close()
    assert status == 0
    groups = _paypoll(env, "--groups")
    assert groups.returncode == 0 and "no consumer group" in groups.stdout
