"""Final transitions reach the user's own dramatiq actor through the outbox (worker/outbox.py),
even across a SIGKILL between the transition and its send."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from tests.fleet_harness import RunningFleet, paypoll_env, running_fleet, write_accounts
from tests.sandbox_fixture import running_sandbox
from tests.waiting import wait_until
from worker.events import group_lags
from worker.keys import Keys
from worker.outbox import CALLBACK_GROUP
from worker.producer import Producer
from worker.settings import load_settings


def test_final_states_are_sent_to_the_callback_actor_and_the_stream(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    namespace = f"{key_prefix}-q"
    received: list[dict[str, str]] = []
    lock = threading.Lock()

    # The user's side: their own broker and worker, with the actor paypoll names.
    user_broker = RedisBroker(url=redis_url, namespace=namespace)

    @dramatiq.actor(broker=user_broker, queue_name="shop-events", actor_name="payment_done")
    def payment_done(event: dict[str, str]) -> None:
        with lock:
            received.append(event)

    user_worker = dramatiq.Worker(user_broker, queues={"shop-events"}, worker_threads=2)
    user_worker.start()
    try:
        with running_sandbox(
            client="shop:shop-secret",
            rate=50,
            pay_after="0.3:1",
            outcomes="paid=0.5,expired=0.25,cancelled=0.25",
            seed=2,
        ) as sandbox:
            env = paypoll_env(
                redis_url=redis_url,
                api_url=sandbox.url,
                key_prefix=key_prefix,
                accounts_file=write_accounts(tmp_path, {"shop": "shop-secret"}, 50),
                callback_actor="shop-events:payment_done",
                poll_first_delay=0.3,
                poll_max_delay=1,
            )
            producer = Producer.from_settings(load_settings(env))
            refs = [
                producer.submit_payment(
                    account="shop",
                    amount="3",
                    redirect_url="https://shop.test/ok",
                    reference_id=f"cb-{i}",
                )
                for i in range(12)
            ]
            with running_fleet(env, processes=1, threads=4):
                wait_until(lambda: len(received) == 12, timeout=60, what="12 callbacks")
        states = {r.reference_id: r.state for r in producer.list_payments()}
    finally:
        user_worker.stop()
        user_broker.close()
    assert sorted(e["reference_id"] for e in received) == sorted(refs)
    for event in received:
        assert event["account"] == "shop"
        assert event["state"] == states[event["reference_id"]]
        assert event["state"] in {"paid", "expired", "cancelled"}
        assert event["payment_id"] and event["event_id"] and event["at"] > 0
    # The event id is the stream entry of the transition: receivers de-duplicate on it.
    finals = {
        fields[b"reference_id"].decode(): entry_id.decode()
        for entry_id, fields in redis_client.xrange(Keys(key_prefix).events())
        if fields[b"to"].decode() in {"paid", "expired", "cancelled"}
    }
    assert {e["reference_id"]: e["event_id"] for e in received} == finals
    # The stream holds every transition, in order, per payment.
    stream = redis_client.xrange(Keys(key_prefix).events())
    moves: dict[str, list[str]] = {}
    for _, fields in stream:
        moves.setdefault(fields[b"reference_id"].decode(), []).append(fields[b"to"].decode())
    for ref in refs:
        assert moves[ref] == ["queued", "creating", "pending", states[ref]]


def _worker_pid(fleet: RunningFleet, index: int) -> int:
    for line in fleet.output().splitlines():
        if '"worker.started"' in line:
            entry = json.loads(line)
            if entry["index"] == index:
                return int(entry["pid"])
    raise AssertionError(f"worker {index} did not start:\n{fleet.output()[-2000:]}")


def test_a_callback_survives_a_sigkill_between_the_transition_and_its_send(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """The sender (worker process 0) is frozen while process 1 finishes every payment, then the
    whole fleet is SIGKILLed: the transitions are made, their callbacks not sent. The next
    fleet sends every one, each under the event id of its transition."""
    namespace = f"{key_prefix}-q"
    received: list[dict[str, str]] = []
    lock = threading.Lock()
    user_broker = RedisBroker(url=redis_url, namespace=namespace)

    @dramatiq.actor(broker=user_broker, queue_name="shop-events", actor_name="payment_done")
    def payment_done(event: dict[str, str]) -> None:
        with lock:
            received.append(event)

    user_worker = dramatiq.Worker(user_broker, queues={"shop-events"}, worker_threads=2)
    user_worker.start()
    keys = Keys(key_prefix)
    try:
        with running_sandbox(client="shop:shop-secret", rate=50, pay_after="0.5:1.5", seed=3) as sb:
            env = paypoll_env(
                redis_url=redis_url,
                api_url=sb.url,
                key_prefix=key_prefix,
                accounts_file=write_accounts(tmp_path, {"shop": "shop-secret"}, 50),
                callback_actor="shop-events:payment_done",
                poll_first_delay=0.3,
                poll_max_delay=1,
            )
            producer = Producer.from_settings(load_settings(env))
            with running_fleet(env, processes=2, threads=4) as fleet:
                fleet.wait_started()
                sender = _worker_pid(fleet, 0)
                os.kill(sender, signal.SIGSTOP)
                refs = [
                    producer.submit_payment(
                        account="shop",
                        amount="3",
                        redirect_url="https://shop.test/ok",
                        reference_id=f"kill-{i}",
                    )
                    for i in range(10)
                ]
                final = {"paid", "expired", "cancelled"}
                wait_until(
                    lambda: all(producer.get_payment(r).state in final for r in refs),
                    timeout=60,
                    what="every payment final while the sender is frozen",
                )
                fleet.kill()
            [group] = [g for g in group_lags(redis_client, keys) if g.group == CALLBACK_GROUP]
            assert (group.lag or 0) + group.pending >= 10  # made, not sent
            assert received == []
            with running_fleet(env, processes=1, threads=4):
                wait_until(lambda: len(received) >= 10, timeout=60, what="10 callbacks")
    finally:
        user_worker.stop()
        user_broker.close()
    by_ref: dict[str, set[str]] = {}
    for event in received:
        by_ref.setdefault(event["reference_id"], set()).add(event["event_id"])
    assert sorted(by_ref) == sorted(refs)
    assert all(len(ids) == 1 for ids in by_ref.values())  # a re-send keeps its event id
