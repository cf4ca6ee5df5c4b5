"""A real fleet on Redis Cluster and RabbitMQ (issue 14): payments flow from submit to final
through a live reshard of one account's slot, each create made once, no 429, every final state
in the events stream exactly once, and wait_for answering from the cluster."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_topology import ClusterTopology, running_cluster
from tests.fleet_harness import paypoll_env, running_fleet, write_accounts
from tests.rabbitmq_server import RabbitMQ
from tests.sandbox_fixture import running_sandbox
from tests.waiting import wait_until
from worker.connection import connect_redis
from worker.producer import Producer
from worker.settings import load_settings
from worker.store import FINAL

CLIENTS = {"north": "north-secret-Cl1", "south": "south-secret-Cl2", "east": "east-secret-Cl3"}
RATE = 5
PAYMENTS = 90


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterTopology]:
    with running_cluster() as topology:
        yield topology


@pytest.mark.timeout(240)
def test_a_fleet_on_cluster_and_rabbitmq_rides_out_a_live_reshard(
    tmp_path: Path, cluster: ClusterTopology, rabbitmq: RabbitMQ
) -> None:
    with (
        rabbitmq.vhost() as vhost,
        running_sandbox(
            client=[f"{c}:{s}" for c, s in CLIENTS.items()],
            rate=RATE,
            limit_mode="sliding",
            pay_after="2:6",
            outcomes="paid=0.7,expired=0.15,cancelled=0.15",
            seed=21,
        ) as sandbox,
    ):
        env = paypoll_env(
            redis_url=cluster.url,
            api_url=sandbox.url,
            accounts_file=write_accounts(tmp_path, CLIENTS, RATE),
            key_prefix="clf",
            broker_url=rabbitmq.url(vhost),
            # 20 ms between slots instead of 5: this test asks whether a live reshard costs a
            # 429, on 2 cores shared by three masters, RabbitMQ, the sandbox, a 2x8 fleet and
            # the rest of the suite. There one clean-clone run saw a single 429 on a create (6
            # seen in a sliding second by the sandbox, whose own timestamps are taken by a
            # starved Python thread); the limiter's precision at the default margin is what
            # test_ratelimit_sandbox and benchmarks/ratelimit.py measure.
            rate_margin=0.02,
        )
        settings = load_settings(env)
        keys = settings.keys()
        assert keys.cluster
        producer = Producer.from_settings(settings)
        names = sorted(CLIENTS)
        for i in range(PAYMENTS):
            producer.submit_payment(
                account=names[i % len(names)],
                amount="12.50",
                redirect_url="https://shop.test/thanks",
                reference_id=f"order-{i}",
            )
        client = connect_redis(cluster.url)
        moving = "north"
        slot = cluster.slot_of(keys.payment(moving, "x"))
        source = cluster.owner_port(slot)
        with running_fleet(env, processes=2, threads=8) as fleet:
            # The hosted url comes back through the cluster's pub/sub while the fleet works.
            record = producer.wait_for("order-0", account=names[0], timeout=60)
            assert record.url
            wait_until(
                lambda: producer.counts()["pending"] >= 10, timeout=60, what="payments in tracking"
            )
            moved: list[int] = []
            mover = threading.Thread(
                target=lambda: moved.append(cluster.move_slot(slot, batch=2, pause=0.05))
            )
            mover.start()
            mover.join(120)
            assert moved and moved[0] != source and cluster.owner_port(slot) == moved[0]

            def all_final() -> bool:
                counts = producer.counts()
                return sum(counts[s.value] for s in FINAL) == PAYMENTS

            wait_until(all_final, timeout=150, interval=0.25, what=f"{PAYMENTS} payments final")

            # The last transitions sit in their outboxes until the next sweep pass relays them.
            def finals_relayed() -> list[tuple[bytes, bytes]]:
                finals = [
                    (f[b"account"], f[b"reference_id"])
                    for _, f in client.xrange(keys.events())  # type: ignore[union-attr]
                    if f[b"to"].decode() in {s.value for s in FINAL}
                ]
                return finals if len(set(finals)) == PAYMENTS else []

            finals = wait_until(finals_relayed, timeout=10, what="every final event relayed")
            assert fleet.process.poll() is None
        stats = sandbox.stats()
        assert stats["duplicates"] == []
        for client_id in CLIENTS:
            assert stats["clients"][client_id]["rate_limited"] == 0, stats["clients"][client_id]
        made = [n for refs in stats["creates_by_reference"].values() for n in refs.values()]
        assert sorted(made) == [1] * PAYMENTS
        # Every final state reached the events stream once (relayed from the outboxes).
        assert len(finals) == len(set(finals)) == PAYMENTS
        assert all(client.xlen(keys.event_outbox(a)) == 0 for a in CLIENTS)
        assert client.keyslot(keys.payment(moving, "order-0")) == slot  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
def test_a_stopping_worker_relays_the_events_left_in_the_outboxes(
    tmp_path: Path, cluster: ClusterTopology, rabbitmq: RabbitMQ
) -> None:
    """Events written since the last sweep pass would wait in their outboxes for the next
    sweeper, maybe a fleet started days later: a worker process relays them as it stops. Here
    no process of the fleet may lead a sweeper shard (the test holds every lease), so only the
    stop can have relayed the submits' events."""
    clients = {"north": CLIENTS["north"], "south": CLIENTS["south"]}
    with rabbitmq.vhost() as vhost:
        env = paypoll_env(
            redis_url=cluster.url,
            # Never called: without a sweeper nothing is dispatched.
            api_url="http://127.0.0.1:9",
            accounts_file=write_accounts(tmp_path, clients, RATE),
            key_prefix="cls",
            broker_url=rabbitmq.url(vhost),
        )
        settings = load_settings(env)
        keys = settings.keys()
        client = connect_redis(cluster.url)
        for shard in range(settings.sweeper_shards):
            client.set(
                keys.sweeper_shard_lock(shard, settings.sweeper_shards), "elsewhere", px=600_000
            )
        producer = Producer.from_settings(settings)
        refs = {(name, f"order-{name}-{i}") for name in clients for i in range(3)}
        for account, ref in sorted(refs):
            producer.submit_payment(
                account=account,
                amount="9.99",
                redirect_url="https://shop.test/thanks",
                reference_id=ref,
            )
        assert client.xlen(keys.events()) == 0
        assert sum(client.xlen(keys.event_outbox(a)) for a in clients) == len(refs)
        with running_fleet(env, processes=1, threads=2) as fleet:
            fleet.wait_started(1, timeout=60)
            # Nothing may be relayed while the worker runs: no shard is led.
            assert client.xlen(keys.events()) == 0
            assert fleet.stop() == 0
            log = fleet.output()
        relayed = {
            (f[b"account"].decode(), f[b"reference_id"].decode())
            for _, f in client.xrange(keys.events())  # type: ignore[union-attr]
        }
        assert relayed == refs
        assert client.xlen(keys.events()) == len(refs)
        assert all(client.xlen(keys.event_outbox(a)) == 0 for a in clients)
        assert '"worker.events_relayed"' in log and f'"events": {len(refs)}' in log
