"""Sharded sweeper (issue 14, part 3): accounts split by hash slot among shard leases, each led
by one process; shards spread over processes; a dead leader's shards are led again within the
lock's TTL; PAYPOLL_SWEEPER_SHARDS=1 is the single sweeper of old."""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from tests.fleet_harness import paypoll_env, pid_alive, running_fleet, write_accounts
from tests.sandbox_fixture import running_sandbox
from tests.waiting import wait_until
from worker.errors import ConfigError
from worker.keys import Keys
from worker.producer import Producer
from worker.settings import Account, Secret, Settings, load_settings
from worker.shards import FREE_GRACE, partition, plan_leases, shard_of
from worker.store import PaymentStore
from worker.sweeper import Sweeper, SweeperThread

ACCOUNTS = [f"acct{i:02d}" for i in range(24)]


# --- the mapping and the plan (pure) -------------------------------------------------------------
def test_an_accounts_shard_is_its_hash_slots_range() -> None:
    keys = Keys("pp")
    for account in ACCOUNTS:
        slot = key_slot(keys.payment(account, "x").encode())  # any key of the account
        for shards in (1, 2, 5, 16):
            shard = shard_of(keys, account, shards)
            assert shard * 16384 <= slot * shards < (shard + 1) * 16384
    split = partition(keys, ACCOUNTS, 4)
    assert sorted(a for group in split.values() for a in group) == sorted(ACCOUNTS)
    assert all(split.values()), split  # 24 accounts: no shard of 4 is empty
    assert partition(Keys("other"), ACCOUNTS, 4) == split  # the prefix is outside the tag


def test_a_shards_sweeper_keeps_the_senders_and_sweeps_only_its_accounts(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    settings = _settings(redis_url, key_prefix, 4)
    store = PaymentStore(
        redis=redis_client, keys=Keys(key_prefix), events_maxlen=settings.events_maxlen
    )

    def send(step: str, account: str, ref: str) -> None: ...

    def send_many(steps: object) -> None: ...

    whole = Sweeper(settings=settings, store=store, send=send, send_many=send_many)
    shard = whole.for_accounts(ACCOUNTS[:3])
    assert (shard.send, shard.send_many, shard.batch) == (send, send_many, whole.batch)
    assert list(shard.accounts()) == ACCOUNTS[:3]
    assert shard.planner is not None and shard.planner.accounts == ACCOUNTS[:3]


def test_shard_lock_keys_are_hash_tagged_per_shard_and_one_shard_keeps_the_old_lock() -> None:
    keys = Keys("pp")
    assert keys.sweeper_shard_lock(3, 8) == "pp:sweeper:{shard-3}:lock"
    assert keys.sweeper_shard_lock(0, 1) == keys.sweeper_lock() == "pp:sweeper:lock"


@pytest.mark.parametrize("raw", ["0", "-2", "1.5", "x", "16385"])
def test_a_bad_shard_count_is_refused_naming_the_setting(raw: str) -> None:
    with pytest.raises(ConfigError, match="PAYPOLL_SWEEPER_SHARDS"):
        load_settings({"PAYPOLL_SWEEPER_SHARDS": raw})
    assert load_settings({"PAYPOLL_SWEEPER_SHARDS": "12"}).sweeper_shards == 12


def test_the_plan_takes_a_fair_share_gives_back_and_takes_long_free_shards() -> None:
    free: dict[int, str | None] = {s: None for s in range(8)}
    alone = plan_leases(identity="a", shards=8, holders=free, live=["a"], free_for={})
    assert sorted(alone.take) == list(range(8)) and alone.fair_share == 8
    two = plan_leases(identity="a", shards=8, holders=free, live=["a", "b"], free_for={})
    assert len(two.take) == 4 and not two.release
    # Two more than another live process: one back per check, none while shards are free.
    three: dict[int, str | None] = {0: "a", 1: "a", 2: "b", 3: "b"}
    uneven = plan_leases(identity="a", shards=4, holders=three, live=["a", "b", "c"], free_for={})
    assert len(uneven.release) == 1 and uneven.fair_share == 2
    settled = {**three, 1: "c"}
    assert not plan_leases(identity="b", shards=4, holders=settled, live="abc", free_for={}).release
    all_a: dict[int, str | None] = {s: "a" for s in range(8)}
    back = plan_leases(identity="a", shards=8, holders=all_a, live=["a", "b"], free_for={})
    assert len(back.release) == 1 and not back.take
    some_free = {**all_a, 7: None}
    assert not plan_leases(
        identity="a", shards=8, holders=some_free, live=["a", "b"], free_for={}
    ).release
    # At its share, a process leaves a free shard to the others for FREE_GRACE, then takes it.
    even: dict[int, str | None] = {s: "ab"[s % 2] for s in range(8)}
    even[6] = None
    args = {"identity": "a", "shards": 8, "holders": even, "live": ["a", "b", "c"]}
    assert not plan_leases(**args, free_for={6: 0.1}).take  # type: ignore[arg-type]
    assert plan_leases(**args, free_for={6: FREE_GRACE}).take == (6,)  # type: ignore[arg-type]


# --- sweeper threads on a real Redis --------------------------------------------------------------
def _settings(redis_url: str, prefix: str, shards: int) -> Settings:
    accounts = {a: Account(a, a, Secret("s"), 5.0) for a in ACCOUNTS}
    return Settings(
        redis_url=redis_url,
        key_prefix=prefix,
        accounts=accounts,
        sweeper_shards=shards,
        sweep_interval=0.05,
    )


def _holders(client: redis.Redis, keys: Keys, shards: int) -> dict[int, str | None]:
    raw = [client.get(keys.sweeper_shard_lock(s, shards)) for s in range(shards)]
    return {s: v.decode() if v else None for s, v in enumerate(raw)}


@contextmanager
def _threads(
    settings: Settings, client: redis.Redis, names: list[str], sent: list[tuple[str, str]]
) -> Iterator[list[SweeperThread]]:
    store = PaymentStore(
        redis=client, keys=Keys(settings.key_prefix), events_maxlen=settings.events_maxlen
    )
    threads = []
    for name in names:

        def send(step: str, account: str, ref: str, name: str = name) -> None:
            sent.append((name, account))

        threads.append(
            SweeperThread(
                Sweeper(settings=settings, store=store, send=send),
                redis_client=client,
                identity=name,
            )
        )
    for thread in threads:
        thread.beat()
    for thread in threads:
        thread.start()
    try:
        yield threads
    finally:
        for thread in threads:
            thread.stop()
        for thread in threads:
            thread.join(timeout=10)
            thread.wake_listener.join(timeout=10)


def test_shards_spread_over_processes_and_each_account_is_swept_by_its_leader_only(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    shards = 6
    settings = _settings(redis_url, key_prefix, shards)
    keys = Keys(key_prefix)
    store = PaymentStore(redis=redis_client, keys=keys, events_maxlen=settings.events_maxlen)
    producer = Producer(settings=settings, store=store)
    sent: list[tuple[str, str]] = []
    with _threads(settings, redis_client, ["p1", "p2", "p3"], sent) as threads:

        def spread() -> bool:
            held = _holders(redis_client, keys, shards)
            counts = defaultdict(int)
            for holder in held.values():
                counts[holder] += 1
            return None not in counts and sorted(counts.values()) == [2, 2, 2]

        wait_until(spread, timeout=20, what="6 shards led 2 by each of 3 processes")
        held = _holders(redis_client, keys, shards)
        for thread in threads:  # each thread sweeps exactly the shards Redis says it leads
            assert sorted(thread.led) == sorted(s for s, h in held.items() if h == thread.identity)
        sent.clear()
        refs = {
            a: producer.submit_payment(
                account=a, amount="5", redirect_url="https://shop.test/ok", reference_id=f"r-{a}"
            )
            for a in ACCOUNTS
        }
        wait_until(lambda: {a for _, a in sent} >= set(refs), timeout=20, what="every create sent")
    by_account = defaultdict(set)
    for name, account in sent:
        by_account[account].add(name)
    for account, names in by_account.items():
        assert names == {held[shard_of(keys, account, shards)]}, account


def test_a_stopped_leaders_shards_are_taken_after_the_grace_by_a_process_at_its_share(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    shards = 4
    settings = _settings(redis_url, key_prefix, shards)
    keys = Keys(key_prefix)
    sent: list[tuple[str, str]] = []
    with _threads(settings, redis_client, ["p1", "p2"], sent) as (_one, two):
        wait_until(
            lambda: (
                sorted(map(str, _holders(redis_client, keys, shards).values()))
                == ["p1", "p1", "p2", "p2"]
            ),
            timeout=20,
            what="2 shards each",
        )
        # p2 stops and gives its leases back; its heartbeat is still fresh (p1's share stays 2),
        # so p1 takes the free shards only after FREE_GRACE.
        two.stop()
        two.join(timeout=10)
        stopped = time.monotonic()
        wait_until(
            lambda: list(_holders(redis_client, keys, shards).values()) == ["p1"] * 4,
            timeout=30,
            what="p1 leading every shard",
        )
        took = time.monotonic() - stopped
    # p2 released its leases when it stopped: p1 takes them after FREE_GRACE at most.
    assert took < FREE_GRACE + 1.0, took


class _Recording(SweeperThread):
    """A SweeperThread that records its passes: (identity, shard, after a lease check?)."""

    passes: list[tuple[str, int, bool]]
    checked = False

    def check_leases(self) -> None:
        self.checked = True
        super().check_leases()

    def _pass(self, shard: int, woken: Collection[str]) -> None:
        self.passes.append((self.identity, shard, self.checked))
        super()._pass(shard, woken)

    def _pause(self, started: float, last_check: float) -> None:
        self.checked = False
        super()._pause(started, last_check)


def test_a_wake_runs_only_the_pass_of_the_woken_accounts_shard_on_its_leader(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    shards = 4
    # Passes every 3 s: a create sent within a second of its submit was woken.
    settings = replace(_settings(redis_url, key_prefix, shards), sweep_interval=3.0)
    keys = Keys(key_prefix)
    store = PaymentStore(redis=redis_client, keys=keys, events_maxlen=settings.events_maxlen)
    producer = Producer(settings=settings, store=store)
    sent: list[tuple[str, str]] = []
    passes: list[tuple[str, int, bool]] = []
    threads = []
    for name in ("p1", "p2"):

        def send(step: str, account: str, ref: str, name: str = name) -> None:
            sent.append((name, account))

        thread = _Recording(
            Sweeper(settings=settings, store=store, send=send),
            redis_client=redis_client,
            identity=name,
        )
        thread.passes = passes
        threads.append(thread)
        thread.beat()
    for thread in threads:
        thread.start()
    try:
        wait_until(
            lambda: (
                sorted(map(str, _holders(redis_client, keys, shards).values()))
                == ["p1", "p1", "p2", "p2"]
            ),
            timeout=40,
            what="2 shards each",
        )
        wait_until(
            lambda: all(t.wake_listener.subscribed.is_set() for t in threads),
            timeout=10,
            what="wake listeners subscribed",
        )
        held = _holders(redis_client, keys, shards)
        account = ACCOUNTS[0]
        shard = shard_of(keys, account, shards)
        leader = next(t for t in threads if t.identity == held[shard])
        passes.clear()
        # Submit right after the leader's scheduled pass over the shard has ended: its next one
        # is 3 s away, so a create sent within 1.5 s was woken. (A submit that met a scheduled
        # pass was found by it: the test failed so once in CI.)
        wait_until(
            lambda: (held[shard], shard, True) in passes and not leader.checked,
            timeout=10,
            what="the leader's scheduled pass to end",
        )
        passes.clear()
        submitted = time.monotonic()
        producer.submit_payment(
            account=account, amount="5", redirect_url="https://shop.test/ok", reference_id="w1"
        )
        wait_until(lambda: (held[shard], account) in sent, timeout=5, what="the woken create")
        assert time.monotonic() - submitted < 1.5  # woken, not found by a 3 s pass
        woken = [(who, s) for who, s, after_check in passes if not after_check]
        assert woken and set(woken) == {(held[shard], shard)}, passes
    finally:
        for thread in threads:
            thread.stop()
        for thread in threads:
            thread.join(timeout=10)
            thread.wake_listener.join(timeout=10)


# --- real fleets ----------------------------------------------------------------------------------
CLIENTS = {f"shop{i}": f"shop{i}-secret-Kq{i}" for i in range(8)}


def _pid(identity: str) -> int:
    return int(identity.split(":")[1])


@pytest.mark.timeout(180)
def test_a_sigkilled_shard_leader_is_replaced_within_the_lock_ttl_and_payments_finish(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    shards = 4
    keys = Keys(key_prefix)
    clients = [f"{c}:{s}" for c, s in CLIENTS.items()]
    with running_sandbox(client=clients, rate=20, pay_after="3:4") as sandbox:
        env = paypoll_env(
            redis_url=redis_url,
            api_url=sandbox.url,
            key_prefix=key_prefix,
            accounts_file=write_accounts(tmp_path, CLIENTS, 20),
            sweeper_shards=shards,
            dead_after=2,
        )
        settings = load_settings(env)
        ttl = max(3.0, settings.sweep_interval * 20)
        producer = Producer.from_settings(settings)
        with running_fleet(env, processes=3, threads=4) as fleet:
            fleet.wait_started(3)

            def led() -> dict[int, str | None] | None:
                held = _holders(redis_client, keys, shards)
                spread = len({h for h in held.values()}) == 3 and None not in held.values()
                return held if spread else None

            try:
                held = wait_until(led, timeout=40, what="4 shards led by 3 distinct processes")
            except AssertionError:
                print("holders:", _holders(redis_client, keys, shards))  # what the failure saw
                raise
            assert max(list(held.values()).count(h) for h in held.values()) == 2
            refs = [
                producer.submit_payment(
                    account=f"shop{i % 8}",
                    amount="5",
                    redirect_url="https://shop.test/ok",
                    reference_id=f"kill-{i}",
                )
                for i in range(40)
            ]
            victim_shard = next(s for s, h in held.items() if list(held.values()).count(h) == 1)
            victim = held[victim_shard]
            assert victim is not None
            os.kill(_pid(victim), signal.SIGKILL)
            killed = time.monotonic()
            new = wait_until(
                lambda: (
                    (h := _holders(redis_client, keys, shards)[victim_shard]) not in (None, victim)
                    and h
                ),
                timeout=ttl + 10,
                interval=0.02,
                what="the killed leader's shard led by another process",
            )
            took = time.monotonic() - killed
            print(f"shard {victim_shard} led again {took:.2f} s after its leader's SIGKILL")
            assert not pid_alive(_pid(victim))
            assert new != victim
            # The shard is taken once its lease lapses: within the TTL of the last renewal
            # (which came at most one interval before the kill), plus one check.
            assert took <= ttl + 2 * settings.sweep_interval + 0.5, (took, ttl)
            # A create the SIGKILL cut between its sent-mark and its answer is create_unknown
            # by design (invariant 3): settled, for an operator, not lost.
            final = {"paid", "expired", "cancelled", "create_unknown"}
            try:
                wait_until(
                    lambda: all(producer.get_payment(r).state in final for r in refs),
                    timeout=90,
                    interval=0.2,
                    what="every payment final after the leader's death",
                )
            except AssertionError:
                states = {r: producer.get_payment(r).state for r in refs}
                print("not final:", {r: s for r, s in states.items() if s not in final})
                raise
            stats = sandbox.stats()
    assert not stats["duplicates"], stats["duplicates"]


@pytest.mark.timeout(120)
def test_one_shard_is_one_sweeper_on_the_old_lock(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    keys = Keys(key_prefix)
    clients = dict(list(CLIENTS.items())[:3])
    with running_sandbox(
        client=[f"{c}:{s}" for c, s in clients.items()], rate=20, pay_after="0.5:1"
    ) as sandbox:
        env = paypoll_env(
            redis_url=redis_url,
            api_url=sandbox.url,
            key_prefix=key_prefix,
            accounts_file=write_accounts(tmp_path, clients, 20),
            sweeper_shards=1,
        )
        producer = Producer.from_settings(load_settings(env))
        with running_fleet(env, processes=2, threads=4) as fleet:
            fleet.wait_started(2)
            leader = wait_until(
                lambda: redis_client.get(keys.sweeper_lock()), timeout=30, what="one leader"
            )
            assert not list(redis_client.scan_iter(match=f"{key_prefix}:sweeper:{{*"))
            refs = [
                producer.submit_payment(
                    account=f"shop{i % 3}",
                    amount="5",
                    redirect_url="https://shop.test/ok",
                    reference_id=f"one-{i}",
                )
                for i in range(9)
            ]
            final = {"paid", "expired", "cancelled"}
            wait_until(
                lambda: all(producer.get_payment(r).state in final for r in refs),
                timeout=60,
                interval=0.2,
                what="every payment final",
            )
            assert redis_client.get(keys.sweeper_lock()) == leader  # one leader throughout
