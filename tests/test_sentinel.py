"""Redis Sentinel (issue 13, part 2) on a real master, replica and three sentinels: every
process follows a failover by itself, with no duplicate create, no 429 and nothing lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.fleet_harness import paypoll_env, running_fleet, write_accounts
from tests.sandbox_fixture import running_sandbox
from tests.sentinel_topology import running_sentinels
from tests.waiting import wait_until
from worker.connection import connect_redis, parse_sentinel_url
from worker.errors import ConfigError
from worker.producer import Producer
from worker.settings import load_settings

CLIENTS = {"acme": "acme-secret-St1", "globex": "globex-secret-St2"}
SETTLED = {"paid", "expired", "cancelled", "create_unknown"}


def test_sentinel_urls_are_parsed_and_checked() -> None:
    target = parse_sentinel_url("redis+sentinel://:p%40ss@10.0.0.1:26379,h2:26380/mymaster/2")
    assert target.sentinels == [("10.0.0.1", 26379), ("h2", 26380)]
    assert (target.service, target.db, target.password) == ("mymaster", 2, "p@ss")
    assert "p@ss" not in repr(target)
    for bad in ("redis+sentinel://h:1", "redis+sentinel://h/mymaster", "redis+sentinel://h:1/m/x"):
        with pytest.raises(ConfigError) as err:
            load_settings({"PAYPOLL_REDIS_URL": bad})
        assert str(err.value).startswith("PAYPOLL_REDIS_URL")
    settings = load_settings({"PAYPOLL_REDIS_URL": "redis+sentinel://h:1/m"})
    assert settings.wait_replicas() == 1
    assert load_settings({"PAYPOLL_REDIS_URL": "redis://h:1/0"}).wait_replicas() == 0


def test_a_fleet_rides_out_a_failover_and_a_killed_master(tmp_path: Path) -> None:
    with (
        running_sentinels() as topology,
        running_sandbox(
            client=[f"{c}:{s}" for c, s in CLIENTS.items()],
            rate=5,
            pay_after="1:3",
            outcomes="paid=0.6,expired=0.2,cancelled=0.2",
            seed=8,
        ) as sandbox,
    ):
        env = paypoll_env(
            redis_url=topology.url,
            api_url=sandbox.url,
            key_prefix="sent",
            accounts_file=write_accounts(tmp_path, CLIENTS, 5),
            poll_first_delay=0.5,
            poll_max_delay=1,
        )
        producer = Producer.from_settings(load_settings(env))
        client = connect_redis(topology.url)
        client.set("probe", "1")
        refs: list[tuple[str, str]] = []
        failures: list[str] = []
        stop = threading.Event()

        def submit_forever() -> None:
            i = 0
            while not stop.is_set():
                account = ("acme", "globex")[i % 2]
                ref = f"s-{i}"
                try:
                    producer.submit_payment(
                        account=account,
                        amount="5",
                        redirect_url="https://s.test/ok",
                        reference_id=ref,
                    )
                    refs.append((account, ref))
                except Exception as exc:  # told it failed: not counted as submitted
                    failures.append(type(exc).__name__)
                i += 1
                time.sleep(0.25)

        with running_fleet(env, processes=2, threads=4) as fleet:
            fleet.wait_started()
            submitter = threading.Thread(target=submit_forever, daemon=True)
            submitter.start()
            wait_until(lambda: len(refs) >= 10, timeout=30, what="10 submits")
            first = topology.failover()
            wait_until(lambda: len(refs) >= 25, timeout=60, what="submits after the failover")
            second = topology.kill_master()
            wait_until(lambda: len(refs) >= 40, timeout=60, what="submits after the kill")
            stop.set()
            submitter.join(10)
            wait_until(
                lambda: all(producer.get_payment(r, account=a).state in SETTLED for a, r in refs),
                timeout=120,
                interval=0.5,
                what="every submitted payment settled",
            )
            log = fleet.output()
        stats = sandbox.stats(payments=False)
        # The same client, across two changes of master: the write made before is there.
        assert client.get("probe") == b"1"
        unknown = [
            r for a, r in refs if producer.get_payment(r, account=a).state == "create_unknown"
        ]
    assert first != second
    # Nothing lost: every submit that returned is a payment, created exactly once.
    created = {ref for refs_of in stats["creates_by_reference"].values() for ref in refs_of}
    assert {r for _, r in refs} - set(unknown) <= created
    assert stats["duplicates"] == []
    # No 429 burst across both changes of master.
    assert sum(c["rate_limited"] for c in stats["clients"].values()) == 0, stats["clients"]
    # The workers reconnected by themselves: no worker died, nobody restarted anything.
    assert '"worker.died"' not in log
    # Submits were refused only while no replica could hold them (the killed master not back
    # yet): the producer was told, nothing it was told succeeded was lost.
    told = {"ReplicationLag", "ConnectionError", "TimeoutError", "ResponseError", "ReadOnlyError"}
    assert set(failures) <= told, failures  # e.g. WAIT unblocked by the change of master
