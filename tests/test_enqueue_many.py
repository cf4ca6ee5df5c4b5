"""worker/actors.py: the sweeper's pipelined enqueue delivers what one-by-one sends deliver."""

from __future__ import annotations

from typing import Any

from worker.actors import TRACK_QUEUE, PaypollBroker, build_broker, declare_actors
from worker.settings import Settings


def _drain(broker: PaypollBroker, queue: str, expected: int) -> list[Any]:
    consumer = broker.consume(queue, prefetch=100, timeout=200)
    got: list[Any] = []
    try:
        for _ in range(expected * 3 + 10):
            message = next(consumer)
            if message is None:
                if len(got) >= expected:
                    break
                continue
            got.append(message)
            consumer.ack(message)
    finally:
        consumer.close()
    return got


def test_send_many_enqueues_each_step_in_order_like_send(redis_url: str, key_prefix: str) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=key_prefix, namespace=key_prefix)
    broker = build_broker(settings)
    assert isinstance(broker, PaypollBroker)  # the Redis broker: pipelined sends
    actors = declare_actors(broker, settings)
    actors.send("track", "acme", "one-by-one")
    steps = [("track", "acme", f"ref-{i}") for i in range(5)] + [("create", "beta", "new")]
    actors.send_many(steps)
    actors.send_many([])  # nothing to send: no round trip, no error
    tracks = _drain(broker, TRACK_QUEUE, 6)
    assert [list(m.args) for m in tracks] == [["acme", "one-by-one"]] + [
        ["acme", f"ref-{i}"] for i in range(5)
    ]
    assert {m.actor_name for m in tracks} == {"paypoll_track"}
    # Each has its own Redis message id (what ack and requeue go by), as enqueue gives.
    assert len({m.options["redis_message_id"] for m in tracks}) == 6
    creates = _drain(broker, "paypoll-create", 1)
    assert [(m.actor_name, list(m.args)) for m in creates] == [("paypoll_create", ["beta", "new"])]
    broker.close()
