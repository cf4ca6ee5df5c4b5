"""Terminal transitions reach the user's own dramatiq actor, and the events stream has them all."""

from __future__ import annotations

import threading
from pathlib import Path

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from tests.fleet_harness import paypoll_env, running_fleet, write_accounts
from tests.sandbox_fixture import running_sandbox
from tests.waiting import wait_until
from worker.keys import Keys
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
    # The stream holds every transition, in order, per payment.
    stream = redis_client.xrange(Keys(key_prefix).events())
    moves: dict[str, list[str]] = {}
    for _, fields in stream:
        moves.setdefault(fields[b"reference_id"].decode(), []).append(fields[b"to"].decode())
    for ref in refs:
        assert moves[ref] == ["queued", "creating", "pending", states[ref]]
