"""The whole pipeline with real parts: Redis, the sandbox over a socket, `paypoll worker` fleets.

Issue 4's proofs: every payment reaches the terminal state the sandbox chose, each is created
exactly once, the rate limit holds, and killed workers, dropped creates, API rejections and
short-lived tokens change none of that.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.fleet_harness import paypoll_env, running_fleet, wait_started, write_accounts
from tests.prometheus_server import samples
from tests.redis_server import free_port
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from tests.waiting import wait_until
from worker.poll_start import POLL_START_SOURCE
from worker.producer import Producer
from worker.ratelimit.limiter import RESERVE_SOURCE
from worker.settings import load_settings
from worker.store import FINAL, PaymentSpec, State

CLIENTS = {"acme": "s3cret-acme", "globex": "s3cret-globex", "initech": "s3cret-initech"}
RATE = 10  # per key, for sandbox and accounts alike: the test proves the bound at any rate


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox(
        client=[f"{cid}:{secret}" for cid, secret in CLIENTS.items()],
        rate=RATE,
        limit_mode="sliding",
        pay_after="0.5:3",
        outcomes="paid=0.7,expired=0.15,cancelled=0.15",
        seed=11,
        max_amount=500,
    ) as sb:
        yield sb


def make_env(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str, **settings: object
) -> dict[str, str]:
    accounts = write_accounts(tmp_path, CLIENTS, RATE)
    defaults: dict[str, object] = {"poll_first_delay": 0.5, "poll_max_delay": 2.0}
    defaults.update(settings)
    return paypoll_env(
        redis_url=redis_url,
        api_url=sandbox.url,
        accounts_file=accounts,
        key_prefix=key_prefix,
        **defaults,
    )


def producer_for(env: dict[str, str]) -> Producer:
    return Producer.from_settings(load_settings(env))


def submit(producer: Producer, count: int, *, amount: str = "10") -> list[tuple[str, str]]:
    names = sorted(CLIENTS)
    refs = []
    for i in range(count):
        account = names[i % len(names)]
        ref = producer.submit_payment(
            account=account,
            amount=amount,
            redirect_url="https://shop.test/thanks",
            reference_id=f"order-{i}",
        )
        refs.append((account, ref))
    return refs


def wait_all_final(producer: Producer, count: int, timeout: float) -> dict[str, int]:
    def done() -> dict[str, int] | None:
        counts = dict(producer.counts())
        return counts if sum(counts[s.value] for s in FINAL) == count else None

    return wait_until(done, timeout=timeout, interval=0.25, what=f"{count} payments final")


def check_rate_and_duplicates(stats: dict[str, Any]) -> None:
    assert stats["duplicates"] == []
    for client_id in CLIENTS:
        client = stats["clients"][client_id]
        assert client["rate_limited"] == 0, client
        assert client["max_accepted_in_1s"] <= RATE, client


def polls_by_route(log_path: Path) -> Counter[str]:
    """The fleet's GETs by how their step reached the worker: run by the process whose
    sweeper claimed it (``local``), or from a broker message (``message``)."""
    routes: Counter[str] = Counter()
    for line in log_path.read_text().splitlines():
        if '"api.request"' in line and '"endpoint": "get"' in line:
            event = json.loads(line)
            routes[
                "local" if event.get("local") else "message" if "message_id" in event else "?"
            ] += 1
    return routes


@pytest.mark.parametrize("local_steps", [True, False], ids=["local-steps", "broker-only"])
def test_payments_reach_the_sandbox_outcome_once_each_within_the_rate(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str, local_steps: bool
) -> None:
    env = make_env(tmp_path, redis_url, sandbox, key_prefix, local_steps=local_steps)
    producer = producer_for(env)
    refs = submit(producer, 200)
    with running_fleet(env, processes=2, threads=8) as fleet:
        counts = wait_all_final(producer, 200, timeout=100)
        assert fleet.process.poll() is None
        routes = polls_by_route(fleet.log_path)
    # Local steps (issue 14): the polls run where they were claimed, no broker message each
    # (a process that falls behind sends some on the broker: most, not all, are local).
    if local_steps:
        assert routes["local"] >= 0.9 * sum(routes.values()), routes
    else:
        assert routes == Counter(message=routes["message"]), routes
    assert routes["local"] + routes["message"] >= 200
    stats = sandbox.stats()
    check_rate_and_duplicates(stats)
    payments = stats["payments"]
    seen = Counter()
    for account, ref in refs:
        record = producer.get_payment(ref, account=account)
        assert record.payment_id in payments, record
        chosen = payments[record.payment_id]
        assert (chosen["client_id"], chosen["reference_id"]) == (account, ref)
        assert record.state == chosen["outcome"], (record, chosen)
        assert record.url.endswith(record.payment_id)
        assert record.polls >= 1 and record.attempts == 1
        seen[record.state] += 1
    creates = stats["creates_by_reference"]
    assert sum(sum(refs.values()) for refs in creates.values()) == 200
    assert counts["paid"] == seen["paid"] > 0 and seen["expired"] > 0 and seen["cancelled"] > 0


def test_killed_worker_loses_nothing_and_creates_nothing_twice(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str
) -> None:
    env = make_env(tmp_path, redis_url, sandbox, key_prefix, sweep_grace=3)
    producer = producer_for(env)
    submit(producer, 120)
    with running_fleet(env, processes=2, threads=8) as fleet:
        wait_started(fleet, 2)
        wait_until(lambda: producer.counts()["pending"] >= 20, timeout=30, what="tracking")
        killed = fleet.kill_worker()
        assert killed is not None
        # A second fleet, as on another host: its own metrics port.
        other_host = dict(env, PAYPOLL_METRICS_PORT=str(free_port()))
        with running_fleet(other_host, processes=1, threads=8) as second:
            wait_started(second, 1)
            # The first fleet's supervisor restarts its worker too; both fleets share the work.
            wait_all_final(producer, 120, timeout=120)
        assert '"worker.died"' in fleet.output()
    stats = sandbox.stats()
    check_rate_and_duplicates(stats)
    states = producer.counts()
    # A create cut off by SIGKILL while on the wire is create_unknown (safe side, invariant 3);
    # each such one was seen at most once by the sandbox.
    unknown = list(producer.list_payments(state="create_unknown"))
    assert len(unknown) <= 2, unknown
    creates = stats["creates_by_reference"]
    for record in unknown:
        assert creates.get(record.account, {}).get(record.reference_id, 0) <= 1
    assert states["paid"] + states["expired"] + states["cancelled"] == 120 - len(unknown)


def test_dropped_creates_become_create_unknown_and_are_never_reposted(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str
) -> None:
    sandbox.set_faults(drop_create_rate=0.2)
    env = make_env(tmp_path, redis_url, sandbox, key_prefix)
    producer = producer_for(env)
    submit(producer, 60)
    with running_fleet(env, processes=1, threads=8):
        wait_all_final(producer, 60, timeout=60)
    stats = sandbox.stats()
    check_rate_and_duplicates(stats)
    dropped = {(d["client_id"], d["reference_id"]) for d in stats["dropped_creates"]}
    unknown = {(r.account, r.reference_id) for r in producer.list_payments(state="create_unknown")}
    assert dropped, "the sandbox dropped no create: the test proves nothing"
    assert unknown == dropped
    for account, ref in unknown:
        assert "Ambiguous" in producer.get_payment(ref, account=account).last_error


def test_api_rejections_are_final_with_the_api_message_and_never_retried(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str
) -> None:
    env = make_env(tmp_path, redis_url, sandbox, key_prefix)
    producer = producer_for(env)
    # 422: valid for paypoll, refused by the API (sandbox --max-amount 500).
    producer.submit_payment(
        account="acme", amount="900", redirect_url="https://shop.test/x", reference_id="too-big"
    )
    # 400: a record that bypassed validation (as an older producer might have written it).
    producer.store.submit(
        PaymentSpec(
            account="globex",
            reference_id="bad-currency",
            amount="5",
            currency="EUR",
            redirect_url="https://shop.test/x",
        )
    )
    producer.submit_payment(
        account="acme", amount="5", redirect_url="https://shop.test/x", reference_id="fine"
    )
    with running_fleet(env, processes=1, threads=4):
        wait_all_final(producer, 3, timeout=40)
    big = producer.get_payment("too-big", account="acme")
    eur = producer.get_payment("bad-currency", account="globex")
    assert big.state == eur.state == State.REJECTED
    assert "amount exceeds the maximum" in big.last_error and "422" in big.last_error
    assert "currency" in eur.last_error and "400" in eur.last_error
    creates = sandbox.stats()["creates_by_reference"]
    assert creates.get("acme", {}).get("too-big", 0) == 0  # refused: nothing was made
    requests = sandbox.stats()["clients"]["acme"]["requests"]["POST /payments/request"]
    assert requests == {"422": 1, "200": 1}  # one attempt each, never retried


def test_tokens_expiring_every_few_seconds_cause_no_failure(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    with running_sandbox(
        client=[f"{c}:{s}" for c, s in CLIENTS.items()],
        rate=RATE,
        token_ttl=2,
        pay_after="2:6",
        seed=5,
    ) as sandbox:
        env = make_env(tmp_path, redis_url, sandbox, key_prefix, token_renew_before=0.5)
        producer = producer_for(env)
        submit(producer, 45)
        with running_fleet(env, processes=2, threads=4):
            counts = wait_all_final(producer, 45, timeout=60)
        stats = sandbox.stats()
    check_rate_and_duplicates(stats)
    assert counts["failed"] == counts["create_unknown"] == counts["rejected"] == 0
    for client_id in CLIENTS:
        client = stats["clients"][client_id]
        assert client["token_calls"] >= 2  # tokens really expired and were renewed
        statuses = Counter()
        for per_status in client["requests"].values():
            statuses.update(per_status)
        assert set(statuses) <= {"200", "401"}, statuses


class ReservationCounter:
    """Counts the slots the limiter's scripts book on a Redis, with MONITOR: a booking is the
    one SET of a key's limiter state (``...:rl``) that reserve.lua makes, run on its own or
    inside a poll's start (poll_start.lua). MONITOR shows a script's own commands right after
    it, with nothing in between (Redis runs a script alone), so each SET is the last script's;
    the fence's and the penalty's SETs are left out."""

    def __init__(self, redis_url: str) -> None:
        self._client = redis.Redis.from_url(redis_url)
        # Loaded before the fleet starts: the fleet's EVALSHAs then carry these digests.
        self._booking_scripts = {
            self._client.script_load(RESERVE_SOURCE),
            self._client.script_load(POLL_START_SOURCE),
        }
        self.count = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "MONITOR did not start"

    def _watch(self) -> None:
        script = ""  # the digest of the last EVALSHA a client sent
        with self._client.monitor() as monitor:
            self._ready.set()
            for command in monitor.listen():
                if self._stop.is_set():
                    return
                words = str(command.get("command", "")).split()
                if command.get("client_type") != "lua":
                    script = words[1] if words[:1] == ["EVALSHA"] and len(words) > 1 else ""
                elif words[:1] == ["SET"] and words[1].endswith(":rl"):
                    self.count += script in self._booking_scripts

    def stop(self) -> int:
        """Stop counting (after the commands already sent) and return the count."""
        self._stop.set()
        self._client.ping()  # wakes the listener, which then sees the flag
        self._thread.join(10)
        return self.count


def test_far_slots_are_held_and_every_call_costs_one_reservation(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str
) -> None:
    """With max_wait 0.05 s (less than one slot of a key at 10/s) most steps find their key's
    next slot too far: it is held for the rescheduled step, which comes back and uses it
    without a second reservation. So the slots booked (by the limiter, or by a poll's start)
    are exactly the calls the sandbox answered, plus the slots given up because their caller
    got to them late (each costs a fresh one). (At 0.2 s, paced dispatch sometimes found no
    far slot at all.)"""
    env = make_env(tmp_path, redis_url, sandbox, key_prefix, max_wait=0.05)
    producer = producer_for(env)
    counter = ReservationCounter(redis_url)
    submit(producer, 45)
    with running_fleet(env, processes=2, threads=8) as fleet:
        wait_started(fleet, 2)
        counts = wait_all_final(producer, 45, timeout=90)
        metrics = requests.get(f"http://127.0.0.1:{env['PAYPOLL_METRICS_PORT']}/metrics", timeout=5)
    reservations = counter.stop()
    assert counts[State.CREATE_UNKNOWN.value] == 0
    stats = sandbox.stats(payments=False)
    check_rate_and_duplicates(stats)
    calls = sum(stats["clients"][c]["total"] for c in CLIENTS)
    found = samples(metrics.text)
    held = sum(
        v for (name, labels), v in found.items() if name == "paypoll_limiter_far_slots_total"
    )
    late = sum(v for (name, _), v in found.items() if name == "paypoll_limiter_late_slots_total")
    assert held > 0, "no step found its slot too far: the test proves nothing"
    assert reservations == calls + late, (reservations, calls, late, held)


def test_a_burst_of_submits_with_far_slots_creates_at_the_keys_pace(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str
) -> None:
    """150 payments submitted at once to a running fleet, max_wait 0.3 s: most creates find
    their slot too far and come back for it (a held create). Held creates are claimed when
    due, outside the creates' pace: left behind the backlog, their slots went stale, each came
    back for a fresh one and bookings outran the rate, so creates became far slots over and
    over (measured before the fix: 14 of 100 created in 6 s, 5 keys at 5/s)."""
    env = make_env(tmp_path, redis_url, sandbox, key_prefix, max_wait=0.3, sweep_interval=0.1)
    producer = producer_for(env)
    with running_fleet(env, processes=1, threads=8) as fleet:
        wait_started(fleet, 1)
        started = time.monotonic()
        refs = submit(producer, 150)
        wait_until(
            lambda: all(producer.get_payment(r, account=a).created_at for a, r in refs),
            timeout=60,
            interval=0.25,
            what="150 payments created",
        )
        took = time.monotonic() - started
    stats = sandbox.stats(payments=False)
    check_rate_and_duplicates(stats)
    # 50 creates per key at 10/s need 5 s; the key's polls of the first payments share it.
    assert took < 20, f"150 creates took {took:.1f} s"
