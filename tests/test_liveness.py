"""Leases bound to liveness (issue 13, part 1): a dead worker's steps run again within
PAYPOLL_DEAD_AFTER, not after the 30 s lease, and a paused worker causes no second create."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import redis

from tests.fleet_harness import paypoll_env, pid_alive, running_fleet, write_accounts
from tests.sandbox_fixture import running_sandbox
from tests.waiting import wait_until
from worker.keys import Keys
from worker.producer import Producer
from worker.settings import load_settings

CLIENT = {"shop": "shop-secret-Lv1"}


def _owners(client: redis.Redis, keys: Keys, step: str) -> dict[str, str]:
    raw = client.hgetall(keys.owners("shop"))
    return {
        k.decode().split(":", 1)[1]: v.decode()
        for k, v in raw.items()
        if k.decode().startswith(step + ":")
    }


def test_a_killed_workers_polls_run_again_within_dead_after(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    keys = Keys(key_prefix)
    # Polls take 1.5 s at the API: a SIGKILL always finds some in flight.
    with running_sandbox(
        client=f"shop:{CLIENT['shop']}", rate=50, latency="get=1500:1500", pay_after="3000:3000"
    ) as sandbox:
        env = paypoll_env(
            redis_url=redis_url,
            api_url=sandbox.url,
            key_prefix=key_prefix,
            accounts_file=write_accounts(tmp_path, CLIENT, 50),
            poll_policy="backoff",
            poll_first_delay=0.2,
            poll_max_delay=0.5,
            dead_after=2,
        )
        producer = Producer.from_settings(load_settings(env))
        refs = [
            producer.submit_payment(
                account="shop",
                amount="5",
                redirect_url="https://shop.test/ok",
                reference_id=f"live-{i}",
            )
            for i in range(6)
        ]
        with running_fleet(env, processes=1, threads=8) as doomed:
            wait_until(
                lambda: len(_owners(redis_client, keys, "track")) >= 3,
                timeout=30,
                what="polls in flight",
            )
            owned = _owners(redis_client, keys, "track")
            polls = {r: producer.get_payment(r).polls for r in owned}
            doomed.kill()
            killed_at = time.monotonic()
        assert all(r in refs for r in owned)
        with running_fleet(env, processes=1, threads=8):
            # Each poll that was running when its worker died runs again (and completes).
            wait_until(
                lambda: all(producer.get_payment(r).polls > polls[r] for r in owned),
                timeout=25,
                interval=0.05,
                what="the killed worker's polls run again",
            )
            took = time.monotonic() - killed_at
    # dead_after (2 s) + the new fleet's start + a pass + the 1.5 s poll, far below the 30 s lease.
    assert took < 15, took


def test_a_paused_worker_causes_no_second_create(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """A worker is SIGSTOPped while its creates wait for the API's answer, past dead_after; the
    other worker takes those creates over; SIGCONT: every payment was created exactly once."""
    keys = Keys(key_prefix)
    with running_sandbox(
        client=f"shop:{CLIENT['shop']}",
        rate=50,
        latency="create=2000:2000",
        pay_after="0.5:1",
        outcomes="paid=1",
    ) as sandbox:
        env = paypoll_env(
            redis_url=redis_url,
            api_url=sandbox.url,
            key_prefix=key_prefix,
            accounts_file=write_accounts(tmp_path, CLIENT, 50),
            poll_first_delay=0.3,
            poll_max_delay=1,
            dead_after=1.5,
            read_timeout=3,
        )
        producer = Producer.from_settings(load_settings(env))
        with running_fleet(env, processes=2, threads=4) as fleet:
            fleet.wait_started()
            refs = [
                producer.submit_payment(
                    account="shop",
                    amount="5",
                    redirect_url="https://shop.test/ok",
                    reference_id=f"pause-{i}",
                )
                for i in range(8)
            ]
            wait_until(
                lambda: _owners(redis_client, keys, "create"), timeout=20, what="creates in flight"
            )
            owner = next(iter(_owners(redis_client, keys, "create").values()))
            pid = int(owner.split(":")[1])
            os.kill(pid, signal.SIGSTOP)
            try:
                # Past dead_after, the other worker's sweeper puts the paused one's steps back.
                wait_until(
                    lambda: '"sweeper.recovered"' in fleet.output(),
                    timeout=30,
                    what="the paused worker's steps recovered",
                )
                time.sleep(3)  # the re-runs happen while it is still paused
            finally:
                os.kill(pid, signal.SIGCONT)
            final = {"paid", "create_unknown"}
            wait_until(
                lambda: all(producer.get_payment(r).state in final for r in refs),
                timeout=60,
                what="every payment settled",
            )
            states = {r: producer.get_payment(r).state for r in refs}
        stats = sandbox.stats(payments=False)
    creates = stats["creates_by_reference"].get("shop", {})
    assert stats["duplicates"] == [] and sorted(creates) == sorted(refs)
    assert all(count == 1 for count in creates.values()), creates
    assert sum(c["rate_limited"] for c in stats["clients"].values()) == 0
    assert "paid" in states.values()


def test_a_paused_worker_whose_fleet_died_meanwhile_stops_once_continued(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """SIGSTOP a worker process, SIGKILL its fleet (the kernel queues PDEATHSIG's SIGTERM for
    the stopped process), SIGCONT: the worker stops by itself, it does not run on unsupervised.
    (Whichever of its threads runs first takes the signal; the main thread must still see it.)"""
    env = paypoll_env(
        redis_url=redis_url,
        api_url="http://127.0.0.1:9",
        key_prefix=key_prefix,
        accounts_file=write_accounts(tmp_path, CLIENT, 5),
    )
    with running_fleet(env, threads=4) as fleet:
        fleet.wait_started()
        child = fleet.children()[0]
        os.kill(child, signal.SIGSTOP)
        try:
            wait_until(lambda: _state(child) == "T", timeout=10, what="the worker stopped")
            fleet.kill(supervisor_only=True)
            wait_until(lambda: _sigterm_pending(child), timeout=10, what="PDEATHSIG queued")
        finally:
            os.kill(child, signal.SIGCONT)
        wait_until(lambda: not pid_alive(child), timeout=40, what="the orphan stopped")
        assert '"worker.stopped"' in fleet.output()


def _state(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return ""


def _sigterm_pending(pid: int) -> bool:
    """SIGTERM in the process's shared pending set (/proc/PID/status ShdPnd, bit 15)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_dead_workers_are_those_silent_past_dead_after_on_the_redis_clock(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    """Beats are compared on Redis's clock: silent past dead_after (5 s) is dead, a recent
    beat is alive, one older than the forget horizon (an hour) is no longer anyone's."""
    from worker.settings import Settings
    from worker.store import PaymentStore
    from worker.sweeper import Sweeper

    settings = Settings(redis_url="redis://unused", key_prefix=key_prefix, dead_after=5.0)
    store = PaymentStore(redis=redis_client, keys=Keys(key_prefix))
    seconds, micros = redis_client.time()
    now = seconds + micros / 1e6
    redis_client.zadd(
        store.keys.heartbeat(),
        {"alive": now - 1, "dead": now - 10, "long-gone": now - 7200, "barely": now - 4.5},
    )
    sweeper = Sweeper(settings=settings, store=store, send=lambda *step: None)
    assert sweeper.dead_workers() == ["dead"]
