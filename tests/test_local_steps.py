"""Local steps (worker/local_steps.py, issue 14): a worker process runs the polls its sweeper
claims, started in batches, sent at their slots from a timer, their outcomes written in
batches; what it has not sent goes back to the store when it stops, and a dead claimer's steps
come back through their owner. On a private real Redis per test and the real sandbox (strict
limit of 5 per key in any 1-second window)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
import redis
from prometheus_client import REGISTRY

from tests.redis_server import RedisServer, running_redis
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from tests.waiting import wait_until
from worker.lean_script import call_many, register_lean_script
from worker.local_steps import LocalSteps
from worker.runtime import Runtime
from worker.settings import Account, Secret, Settings
from worker.store import PaymentSpec, State, TransitionWrite
from worker.sweeper import Sweeper, SweeperThread

CLIENT, SECRET = "acme", "acme-secret"
ACTORS = {"create": "paypoll_create", "track": "paypoll_track"}
SAMPLE, ROUTES = "paypoll_local_steps_total", ("local", "spilled")


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    # One per test: each test's limiter is a new private Redis, which knows nothing of the
    # calls an earlier test made to the key.
    with running_sandbox(client=f"{CLIENT}:{SECRET}", rate=5, pay_after="600:700") as sb:
        yield sb


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with running_redis() as s:
        yield s


def build(server: RedisServer, sandbox: RunningSandbox, *, identity: str) -> Runtime:
    settings = Settings(
        redis_url=server.url,
        api_url=sandbox.url,
        key_prefix="ls",
        accounts={CLIENT: Account(CLIENT, CLIENT, Secret(SECRET), rate=5)},
        read_timeout=2.0,
        connect_timeout=1.0,
    )
    rt = Runtime.build(settings)
    rt.identity = identity
    rt.redis.zadd(rt.keys.heartbeat(), {identity: time.time()})
    return rt


def claimed(rt: Runtime, sandbox: RunningSandbox, count: int) -> list[str]:
    """``count`` pending payments made in the sandbox and tracked here, their track steps
    claimed by ``rt``'s process as its sweeper would claim them; their references. The
    account's token is taken first, so that no poll's slot goes to a token call."""
    rt.client.tokens.get(rt.settings.account(CLIENT), max_wait=5.0)
    refs = []
    for i, payment_id in enumerate(sandbox.seed(CLIENT, count, prefix=f"{rt.identity}-")):
        ref = f"{rt.identity}-r{i}"
        assert rt.store.register_tracking(CLIENT, ref, payment_id)
        refs.append(ref)
    claim = rt.store.claim_due_many({CLIENT: count}, lease=30, batch=count, claimer=rt.identity)[
        CLIENT
    ]
    assert sorted(claim.tracks) == sorted(refs)
    return refs


def polls_of(rt: Runtime, sandbox: RunningSandbox, refs: list[str]) -> dict[str, int]:
    """The GETs the sandbox answered for each payment of ``refs``."""
    payments = sandbox.stats()["payments"]
    polls = {}
    for ref in refs:
        record = rt.store.get(CLIENT, ref)
        assert record is not None
        polls[ref] = payments[record.payment_id]["polls"]
    return polls


def test_offered_polls_are_sent_once_each_within_the_limit_and_their_outcomes_stored(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    rt = build(server, sandbox, identity="one")
    refs = claimed(rt, sandbox, 12)
    before = sandbox.client_stats(CLIENT)
    local = LocalSteps(runtime=rt, threads=2, actor_names=ACTORS, write_every=0.05)
    local.start()
    try:
        assert local.offer([("track", CLIENT, ref) for ref in refs]) == []
        wait_until(
            lambda: all(
                (r := rt.store.get(CLIENT, ref)) is not None and r.polls == 1 for ref in refs
            ),
            timeout=15,
            what="every offered poll answered and its outcome written",
        )
        wait_until(lambda: sum(local.waiting().values()) == 0, timeout=5, what="stages empty")
    finally:
        local.stop()
    assert polls_of(rt, sandbox, refs) == dict.fromkeys(refs, 1)
    after = sandbox.client_stats(CLIENT)
    assert after.get("rate_limited", 0) == before.get("rate_limited", 0)
    assert after["max_accepted_in_1s"] <= 5
    for ref in refs:
        record = rt.store.get(CLIENT, ref)
        assert record is not None and record.state == State.PENDING
        assert record.api_status == "pending"
        # The next poll is scheduled, and the step is no longer in flight.
        assert rt.redis.zscore(rt.keys.due(CLIENT, "track"), ref) is not None
        assert rt.redis.zscore(rt.keys.inflight(CLIENT, "track"), ref) is None


def test_stop_puts_back_the_polls_not_sent_and_sends_none_of_them(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    rt = build(server, sandbox, identity="two")
    refs = claimed(rt, sandbox, 15)  # 15 slots at 5/s: the last ones are 2-3 s away
    local = LocalSteps(runtime=rt, threads=2, actor_names=ACTORS)
    local.start()
    local.offer([("track", CLIENT, ref) for ref in refs])
    wait_until(lambda: local.waiting()["at_timer"] >= 5, timeout=10, what="polls on the timer")
    back = local.stop()
    assert back >= 5
    polled = polls_of(rt, sandbox, refs)
    sent = {ref for ref, n in polled.items() if n}
    due = {
        (m.decode() if isinstance(m, bytes) else m)
        for m in rt.redis.zrange(rt.keys.due(CLIENT, "track"), 0, -1)
    }
    unsent = set(refs) - sent
    assert len(unsent) == back
    # Every unsent poll is due again, not in flight, and owned by nobody.
    assert unsent <= due
    inflight = rt.redis.zrange(rt.keys.inflight(CLIENT, "track"), 0, -1)
    assert not unsent & {m.decode() for m in inflight}
    owners = rt.redis.hgetall(rt.keys.owners(CLIENT))
    assert not {f"track:{ref}".encode() for ref in unsent} & set(owners)
    # Those sent were written (none is lost between answer and write at stop).
    for ref in sent:
        record = rt.store.get(CLIENT, ref)
        assert record is not None and record.polls == 1


def test_a_dead_claimers_claimed_steps_are_due_again_through_their_owner(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    rt = build(server, sandbox, identity="claimer")
    refs = claimed(rt, sandbox, 4)
    owners = rt.redis.hgetall(rt.keys.owners(CLIENT))
    assert {f"track:{ref}".encode(): b"claimer" for ref in refs}.items() <= owners.items()
    claim = rt.store.claim_due_many({CLIENT: 0}, lease=30, batch=10, dead=["claimer"])[CLIENT]
    assert claim.recovered == 4
    assert rt.redis.zcard(rt.keys.inflight(CLIENT, "track")) == 0
    assert rt.redis.zcard(rt.keys.due(CLIENT, "track")) == 4


def test_put_back_leaves_steps_another_process_owns(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    rt = build(server, sandbox, identity="first")
    refs = claimed(rt, sandbox, 3)
    # Another process started the first one meanwhile (its owner now).
    rt.redis.hset(rt.keys.owners(CLIENT), f"track:{refs[0]}", "second")
    assert rt.store.put_back(CLIENT, "track", refs, owner="first") == 2
    assert rt.redis.zscore(rt.keys.inflight(CLIENT, "track"), refs[0]) is not None
    for ref in refs[1:]:
        assert rt.redis.zscore(rt.keys.due(CLIENT, "track"), ref) is not None


def test_offer_takes_what_there_is_room_for_and_nothing_once_stopping(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    rt = build(server, sandbox, identity="room")
    local = LocalSteps(runtime=rt, threads=1, actor_names=ACTORS)
    local._room = 3  # not started: nothing leaves the queue
    steps = [("track", CLIENT, f"x{i}") for i in range(5)]
    assert local.offer(steps) == steps[3:]
    assert local.waiting()["to_start"] == 3
    local.stop()
    assert local.offer(steps) == steps


def test_call_many_answers_as_one_by_one_with_errors_in_place_and_after_a_flush(
    server: RedisServer,
) -> None:
    client = redis.Redis.from_url(server.url)
    script = register_lean_script(
        client,
        "if ARGV[1] == 'fail' then return redis.error_reply('PAYPOLL_TEST no') end "
        "return redis.call('INCRBY', KEYS[1], ARGV[1])",
    )
    calls: list[tuple[list[str], list[object]]] = [
        (["cm:a"], [1]),
        (["cm:a"], ["fail"]),
        (["cm:b"], [5]),
        (["cm:a"], [2]),
    ]
    answers = call_many(script, calls)
    assert answers[0] == 1 and answers[2] == 5 and answers[3] == 3
    assert isinstance(answers[1], redis.ResponseError) and "PAYPOLL_TEST no" in str(answers[1])
    client.script_flush()  # every call now meets NOSCRIPT first: each is loaded and run once
    assert call_many(script, [(["cm:a"], [10]), (["cm:b"], [1])]) == [13, 6]
    assert int(client.get("cm:a") or 0) == 13


def test_write_many_writes_each_transition_as_write_does(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    rt = build(server, sandbox, identity="writer")
    refs = claimed(rt, sandbox, 3)
    writes = [
        TransitionWrite(
            CLIENT,
            ref,
            State.PENDING,
            {
                "sources": [State.PENDING],
                "next_step": "track",
                "delay": 5.0,
                "increments": {"polls": 1},
            },
        )
        for ref in refs
    ]
    writes.append(TransitionWrite(CLIENT, "no-such", State.PAID, {"sources": [State.PENDING]}))
    answers = rt.store.write_many(writes)
    assert [a.moved for a in answers if not isinstance(a, Exception)] == [True] * 3 + [False]
    for ref in refs:
        record = rt.store.get(CLIENT, ref)
        assert record is not None and record.polls == 1
        due = rt.redis.zscore(rt.keys.due(CLIENT, "track"), ref)
        assert due is not None and due > time.time() + 3


def test_a_sweeper_pass_runs_its_tracks_here_and_sends_its_creates_on(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    rt = build(server, sandbox, identity="sweeping")
    refs = claimed(rt, sandbox, 3)
    rt.store.put_back(CLIENT, "track", refs, owner="sweeping")  # due again, for the pass
    assert rt.store.submit(
        PaymentSpec(
            account=CLIENT,
            reference_id="new-order",
            amount="5",
            currency="USD",
            redirect_url="https://shop.test/ok",
        )
    )
    sent: list[tuple[str, str, str]] = []
    local = LocalSteps(runtime=rt, threads=1, actor_names=ACTORS)  # not started: keeps them
    # The backoff policy claims every due track (the planner paces them to the key's budget).
    settings = dataclasses.replace(rt.settings, poll_policy="backoff")
    sweeper = Sweeper(
        settings=settings, store=rt.store, send=lambda *s: sent.append(s), local=local
    )
    before = {r: REGISTRY.get_sample_value(SAMPLE, {"route": r}) or 0.0 for r in ROUTES}
    result = sweeper.run_pass()
    assert (result.dispatched_creates, result.dispatched_tracks) == (1, 3)
    assert sent == [("create", CLIENT, "new-order")]
    assert local.waiting()["to_start"] == 3
    after = {r: REGISTRY.get_sample_value(SAMPLE, {"route": r}) or 0.0 for r in ROUTES}
    assert after["local"] - before["local"] == 3 and after["spilled"] == before["spilled"]
    # The tracks are this process's from the claim; the create is nobody's until started.
    owners = rt.redis.hgetall(rt.keys.owners(CLIENT))
    assert {f"track:{ref}".encode() for ref in refs} <= set(owners)
    assert b"create:new-order" not in owners
    # The sweeper thread's report (once per interval) puts the stages on their gauge.
    SweeperThread(sweeper, redis_client=rt.redis, identity="sweeping").report_local_steps()
    waiting = {
        stage: REGISTRY.get_sample_value("paypoll_local_steps_waiting", {"stage": stage})
        for stage in ("to_start", "at_timer", "due", "to_write")
    }
    assert waiting == {"to_start": 3.0, "at_timer": 0.0, "due": 0.0, "to_write": 0.0}
    local.stop()
