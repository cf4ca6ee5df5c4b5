"""worker.wait_for and `paypoll submit --wait` (issue 12, "Wait"): the record as soon as the
payment reaches a state, blocking on Redis pub/sub, and a sweeper woken by the submit."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.fleet_harness import paypoll_env, running_fleet, write_accounts
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from tests.waiting import wait_until
from worker.errors import ValidationError, WaitTimeout
from worker.keys import Keys
from worker.producer import Producer
from worker.settings import Account, Secret, Settings, load_settings
from worker.shards import shard_of
from worker.store import PaymentStore, State

SECRET = "s3cret-wait"


@pytest.fixture
def producer(redis_client: redis.Redis, keys: Keys, redis_url: str) -> Producer:
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix).with_accounts(
        Account("acme", "acme", Secret(SECRET), 5.0)
    )
    store = PaymentStore(redis=redis_client, keys=keys, events_maxlen=1000)
    return Producer(settings=settings, store=store)


def _submit(producer: Producer, ref: str) -> str:
    return producer.submit_payment(
        account="acme", amount="10", redirect_url="https://shop.test/ok", reference_id=ref
    )


def _create_later(store: PaymentStore, ref: str, delay: float) -> threading.Thread:
    """What a create step does, ``delay`` seconds from now, in another thread."""

    def run() -> None:
        time.sleep(delay)  # the "worker" is slow on purpose: the waiter must block meanwhile
        store.transition("acme", ref, State.CREATING, next_step="create")
        store.transition(
            "acme",
            ref,
            State.PENDING,
            next_step="track",
            fields={"payment_id": "pay-1", "url": "https://pay.test/1", "created_at": "$now"},
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_wait_for_returns_the_url_once_the_create_stored_it(producer: Producer) -> None:
    ref = _submit(producer, "w1")
    started = time.monotonic()
    _create_later(producer.store, ref, 0.5)
    record = producer.wait_for(ref, timeout=10)
    elapsed = time.monotonic() - started
    assert record.state == "pending" and record.url == "https://pay.test/1"
    assert 0.5 <= elapsed < 5.0
    # Already there: at once, whatever the timeout.
    started = time.monotonic()
    assert producer.wait_for(ref, account="acme", timeout=0.1).url == "https://pay.test/1"
    assert time.monotonic() - started < 0.1


def test_wait_for_a_final_state_and_a_clear_timeout_without_polling_redis(
    producer: Producer,
) -> None:
    ref = _submit(producer, "w2")
    reads_before = _calls(producer.store.redis, "hgetall")
    with pytest.raises(WaitTimeout) as caught:
        producer.wait_for(ref, states=["paid"], timeout=1.5)
    # Blocked on its channel: one read of the record, not one per loop turn.
    assert _calls(producer.store.redis, "hgetall") - reads_before <= 2
    error = caught.value
    assert (error.account, error.reference_id, error.last_state) == ("acme", ref, "queued")
    assert "w2" in str(error) and "paid" in str(error) and "queued" in str(error)
    _create_later(producer.store, ref, 0.2).join()
    payer = threading.Timer(0.3, lambda: producer.store.transition("acme", ref, State.PAID))
    payer.start()
    assert producer.wait_for(ref, states=["paid", "expired"], timeout=10).state == "paid"
    # The waiter returns on the script's publish, before the payer has read the script's
    # reply: let it finish before the fixture closes the connections.
    payer.join(10)


def test_wait_for_refuses_what_it_cannot_wait_for(producer: Producer) -> None:
    with pytest.raises(ValidationError) as unknown:
        producer.wait_for("nope", timeout=1)
    assert unknown.value.field == "reference_id"
    ref = _submit(producer, "w3")
    with pytest.raises(ValidationError) as bad_state:
        producer.wait_for(ref, states=["payed"], timeout=1)
    assert bad_state.value.field == "states" and "payed" in str(bad_state.value)
    with pytest.raises(ValidationError) as bad_timeout:
        producer.wait_for(ref, timeout=0)
    assert bad_timeout.value.field == "timeout"


def test_a_rejected_payment_ends_the_wait_for_its_url(producer: Producer) -> None:
    ref = _submit(producer, "w4")
    threading.Timer(
        0.3,
        lambda: producer.store.transition(
            "acme", ref, State.REJECTED, fields={"last_error": "amount: too large"}
        ),
    ).start()
    record = producer.wait_for(ref, timeout=10)
    assert record.state == "rejected" and record.url == ""


# --- a real fleet: the submit wakes the sweeper ------------------------------------------------
@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox(
        client=[f"acme:{SECRET}"], rate=5, limit_mode="sliding", pay_after="900:1000", seed=3
    ) as sb:
        yield sb


@pytest.mark.timeout(120)
def test_a_submit_wakes_the_fleet_and_submit_wait_prints_the_url(
    tmp_path: Path, redis_url: str, key_prefix: str, sandbox: RunningSandbox
) -> None:
    # A sweep interval of 8 s: without the wake, a create would wait 4 s on average.
    env = paypoll_env(
        redis_url=redis_url,
        api_url=sandbox.url,
        accounts_file=write_accounts(tmp_path, {"acme": SECRET}, 5),
        key_prefix=key_prefix,
        sweep_interval=8,
    )
    producer = Producer.from_settings(load_settings(env))
    with running_fleet(env, processes=1, threads=4) as fleet:
        fleet.wait_started(1)
        # The fleet's first pass takes the account's sweeper shard; then it sleeps 8 s a pass.
        keys = producer.store.keys
        shards = load_settings(env).sweeper_shards
        lock = keys.sweeper_shard_lock(shard_of(keys, "acme", shards), shards)
        wait_until(
            lambda: producer.store.redis.exists(lock),
            timeout=30,
            what="a sweeper leading",
        )
        time.sleep(0.5)  # past the first pass, so that only a wake can start the next one
        took = []
        for i in range(3):
            started = time.monotonic()
            ref = _submit(producer, f"fleet{i}")
            record = producer.wait_for(ref, timeout=20)
            took.append(time.monotonic() - started)
            assert record.url.startswith(sandbox.url), record
        # Three creates, each well within one interval of its submit: woken, not found.
        assert max(took) < 2.5, took
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", "submit", "--account", "acme", "--amount", "12",
             "--redirect-url", "https://shop.test/ok", "--reference-id", "cli1", "--wait"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == producer.get_payment("cli1").url
        assert result.stdout.startswith(sandbox.url)
        assert SECRET not in result.stdout + result.stderr
    stats = sandbox.stats()
    creates = stats["creates_by_reference"]["acme"]
    assert creates == {"cli1": 1, "fleet0": 1, "fleet1": 1, "fleet2": 1}
    assert stats["duplicates"] == []
    assert sandbox.client_stats("acme")["rate_limited"] == 0
