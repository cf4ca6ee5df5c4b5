"""The create and track steps, run directly against the real sandbox and a real Redis.

Each test drives one decision of worker/steps/: at-most-once creates across redeliveries,
retries that do or do not use up attempts, and every visible end state.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from tests.counting import CountingReserve
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from tests.waiting import wait_until
from worker.ratelimit.limiter import HOLD_LEAD
from worker.runtime import Runtime
from worker.settings import Account, Secret, Settings
from worker.store import PaymentSpec, State

CLIENT, SECRET = "acme", "acme-secret"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox(
        client=f"{CLIENT}:{SECRET}", rate=1000, pay_after="0.2:0.4", outcomes="paid=1", seed=3
    ) as sb:
        yield sb


@pytest.fixture
def runtime(
    sandbox: RunningSandbox, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> Runtime:
    settings = Settings(
        redis_url=redis_url,
        api_url=sandbox.url,
        key_prefix=key_prefix,
        accounts={CLIENT: Account(CLIENT, CLIENT, Secret(SECRET), rate=1000)},
        poll_first_delay=0.1,
        poll_max_delay=0.2,
        read_timeout=1.0,
        connect_timeout=0.5,
        retry_base_delay=0.05,
        retry_max_delay=0.1,
        create_max_attempts=3,
    )
    sandbox.reset()
    rt = Runtime.build(settings, redis_client=redis_client)
    rt.rng = random.Random(1)
    return rt


def submit(rt: Runtime, ref: str = "r1", amount: str = "10") -> None:
    rt.store.submit(
        PaymentSpec(
            account=CLIENT,
            reference_id=ref,
            amount=amount,
            currency="USD",
            redirect_url="https://shop.test/ok",
        )
    )


def creates_seen(sandbox: RunningSandbox, ref: str = "r1") -> int:
    return int(sandbox.stats()["creates_by_reference"].get(CLIENT, {}).get(ref, 0))


def record(rt: Runtime, ref: str = "r1"):  # type: ignore[no-untyped-def]
    rec = rt.store.get(CLIENT, ref)
    assert rec is not None
    return rec


def test_create_then_track_to_paid(rt_sandbox: tuple[Runtime, RunningSandbox]) -> None:
    rt, sandbox = rt_sandbox
    submit(rt)
    from worker.steps import run_create, run_track

    assert run_create(rt, CLIENT, "r1") == "created"
    rec = record(rt)
    assert rec.state == State.PENDING and rec.payment_id and rec.attempts == 1
    assert rt.redis.zscore(rt.keys.due(CLIENT, "track"), "r1") is not None
    # A redelivered create message does nothing: the payment is past creating.
    assert run_create(rt, CLIENT, "r1") == "nothing_to_do"
    sandbox.force_status(rec.payment_id, "paid")
    assert run_track(rt, CLIENT, "r1") == "paid"
    rec = record(rt)
    assert rec.state == State.PAID and rec.polls == 1 and rec.terminal_at is not None
    assert creates_seen(sandbox) == 1
    # It never held a slot: its record carries no hold field at all.
    assert not rt.redis.hexists(rt.keys.payment(CLIENT, "r1"), "slot_hold")


@pytest.fixture
def rt_sandbox(runtime: Runtime, sandbox: RunningSandbox) -> tuple[Runtime, RunningSandbox]:
    return runtime, sandbox


def test_a_create_marked_sent_elsewhere_is_not_posted_again(
    rt_sandbox: tuple[Runtime, RunningSandbox],
) -> None:
    from worker.steps import run_create

    rt, sandbox = rt_sandbox
    submit(rt)
    # Another delivery marked it sent a moment ago and is waiting for the answer.
    assert rt.store.transition(
        CLIENT,
        "r1",
        State.CREATING,
        guard=("phase", ""),
        fields={"phase": "sent", "sent_at": "$now"},
    ).moved
    assert run_create(rt, CLIENT, "r1") == "in_flight_elsewhere"
    assert creates_seen(sandbox) == 0
    # Long after its timeout, nobody recorded an answer: the create is ambiguous.
    rt.redis.hset(rt.keys.payment(CLIENT, "r1"), "sent_at", "1000")
    assert run_create(rt, CLIENT, "r1") == "create_unknown"
    rec = record(rt)
    assert rec.state == State.CREATE_UNKNOWN and "in flight" in rec.last_error
    assert creates_seen(sandbox) == 0


def test_far_slot_reschedules_without_using_an_attempt(
    rt_sandbox: tuple[Runtime, RunningSandbox],
) -> None:
    from worker.steps import run_create

    rt, sandbox = rt_sandbox
    submit(rt)
    rt.limiter.penalize(CLIENT, 5.0)  # the key is paused for 5 s: far beyond max_wait
    assert run_create(rt, CLIENT, "r1") == "far_slot"
    rec = record(rt)
    assert rec.state == State.QUEUED and rec.attempts == 0 and rec.phase == ""
    due = rt.redis.zscore(rt.keys.due(CLIENT, "create"), "r1")
    assert due is not None and due > rt.store.now() + 3
    assert creates_seen(sandbox) == 0


def test_a_far_slot_is_held_for_the_rescheduled_step_which_then_books_nothing(
    rt_sandbox: tuple[Runtime, RunningSandbox],
) -> None:
    from worker.steps import run_create

    rt, sandbox = rt_sandbox
    submit(rt)
    rt.client.tokens.get(rt.settings.account(CLIENT))  # a token in hand: one call per run
    rt.limiter.penalize(CLIENT, 1.5)  # the next slot is 1.5 s away: beyond max_wait, held
    assert run_create(rt, CLIENT, "r1") == "far_slot"
    rec = record(rt)
    assert rec.state == State.QUEUED and rec.attempts == 0 and rec.slot_hold is not None
    assert rec.slot_hold == pytest.approx(rt.store.now() + 1.5, abs=0.1)
    # Due 0.9 x max_wait before the held slot, so that it sleeps the rest.
    due = rt.redis.zscore(rt.keys.due(CLIENT, "create"), "r1")
    assert due == pytest.approx(rec.slot_hold - HOLD_LEAD * rt.settings.max_wait, abs=0.05)
    wait_until(lambda: rt.store.now() >= due, timeout=5, what="the step to be due")
    reserves = CountingReserve(rt.limiter)
    assert run_create(rt, CLIENT, "r1") == "created"
    assert reserves.calls == 0  # the held slot, not a new reservation
    assert rt.store.now() >= rec.slot_hold  # not sent before it
    rec = record(rt)
    assert rec.state == State.PENDING and rec.slot_hold is None and rec.attempts == 1
    assert creates_seen(sandbox) == 1


def test_server_errors_are_retried_until_attempts_run_out(
    rt_sandbox: tuple[Runtime, RunningSandbox],
) -> None:
    from worker.steps import run_create

    rt, sandbox = rt_sandbox
    sandbox.set_faults(error_rate={"create": 1.0})
    submit(rt)
    assert run_create(rt, CLIENT, "r1") == "retry"
    rec = record(rt)
    assert rec.state == State.CREATING and rec.attempts == 1 and "ServerError" in rec.last_error
    assert run_create(rt, CLIENT, "r1") == "retry"
    assert run_create(rt, CLIENT, "r1") == "failed"
    rec = record(rt)
    assert rec.state == State.FAILED and rec.attempts == 3 and "3 attempts" in rec.last_error
    assert creates_seen(sandbox) == 0  # a 5xx is answered without processing


def test_retry_ambiguous_create_reposts_only_when_allowed(
    rt_sandbox: tuple[Runtime, RunningSandbox],
) -> None:
    from worker.steps import run_create

    rt, sandbox = rt_sandbox
    sandbox.set_faults(drop_create_rate=1.0)
    submit(rt, "a")
    assert run_create(rt, CLIENT, "a") == "create_unknown"
    rt.settings = replace(rt.settings, retry_ambiguous_create=True)
    submit(rt, "b")
    assert run_create(rt, CLIENT, "b") == "retry"
    sandbox.set_faults(drop_create_rate=0.0)
    assert run_create(rt, CLIENT, "b") == "created"
    assert creates_seen(sandbox, "a") == 1 and creates_seen(sandbox, "b") == 2
    assert record(rt, "a").state == State.CREATE_UNKNOWN


def test_unknown_status_keeps_polling_and_404_ends_visibly(
    rt_sandbox: tuple[Runtime, RunningSandbox],
) -> None:
    from worker.steps import run_track

    rt, _ = rt_sandbox
    rt.store.register_tracking(CLIENT, "gone", "pr_doesnotexist")
    assert run_track(rt, CLIENT, "gone") == "failed"
    assert "NotFound" in record(rt, "gone").last_error
    # A payment whose status the contract does not know: counted, logged, polled again.
    # (The sandbox shows "processing" from half way to the payment's outcome.)
    with running_sandbox(
        client=f"{CLIENT}:{SECRET}", rate=1000, pay_after="3:3", unknown_status=1.0, seed=1
    ) as odd:
        rt2 = Runtime.build(replace(rt.settings, api_url=odd.url), redis_client=rt.redis)
        from worker.steps import run_create

        submit(rt2, "odd")
        assert run_create(rt2, CLIENT, "odd") == "created"
        payment_id = record(rt2, "odd").payment_id

        def odd_status_shown() -> bool:
            stats = odd.stats()
            return bool(stats["payments"][payment_id]["unknown_status_at"] <= stats["now"])

        wait_until(odd_status_shown, timeout=5, what="the undocumented status")
        polls = [run_track(rt2, CLIENT, "odd") for _ in range(2)]
    assert polls == ["polled", "polled"]
    rec = record(rt, "odd")
    assert rec.state == State.PENDING and rec.polls == 2 and rec.api_status == "processing"


def test_deadline_ends_in_tracking_timeout(rt_sandbox: tuple[Runtime, RunningSandbox]) -> None:
    from worker.steps import run_track

    rt, _ = rt_sandbox
    rt.store.register_tracking(CLIENT, "old", "pr_x")
    rt.redis.hset(rt.keys.payment(CLIENT, "old"), "created_at", "1000")
    assert run_track(rt, CLIENT, "old") == "tracking_timeout"
    rec = record(rt, "old")
    assert rec.state == State.TRACKING_TIMEOUT and rec.next_at is None
    for step in ("create", "track"):
        assert rt.redis.zscore(rt.keys.due(CLIENT, step), "old") is None


def test_a_401_retry_is_not_a_second_send(rt_sandbox: tuple[Runtime, RunningSandbox]) -> None:
    from worker.steps import run_create

    rt, sandbox = rt_sandbox
    submit(rt, "first")
    assert run_create(rt, CLIENT, "first") == "created"  # caches a token
    sandbox.reset()  # the sandbox forgets every token: the next call gets a 401
    submit(rt, "second")
    assert run_create(rt, CLIENT, "second") == "created"
    rec = record(rt, "second")
    assert rec.state == State.PENDING and rec.attempts == 1
    clients = sandbox.stats()["clients"]
    assert clients[CLIENT]["requests"]["POST /payments/request"] == {"200": 1}
    # A token the sandbox forgot names no client: its 401 is counted as anonymous.
    assert clients["(anonymous)"]["requests"]["POST /payments/request"] == {"401": 1}
    assert creates_seen(sandbox, "second") == 1


def test_failed_polls_back_off_and_are_counted_in_the_same_write(
    rt_sandbox: tuple[Runtime, RunningSandbox],
) -> None:
    from worker.steps import run_create, run_track

    rt, sandbox = rt_sandbox
    submit(rt, "flaky")
    assert run_create(rt, CLIENT, "flaky") == "created"
    sandbox.set_faults(error_rate={"get": 1.0})
    assert [run_track(rt, CLIENT, "flaky") for _ in range(2)] == ["retry", "retry"]
    rec = record(rt, "flaky")
    assert rec.state == State.PENDING and rec.errors == 2 and rec.polls == 0
    assert "ServerError" in rec.last_error
    sandbox.set_faults(error_rate={"get": 0.0})
    sandbox.force_status(rec.payment_id, "paid")
    assert run_track(rt, CLIENT, "flaky") == "paid"
    rec = record(rt, "flaky")
    assert rec.errors == 0 and rec.last_error == "" and rec.polls == 1


def test_a_create_too_late_after_its_mark_is_not_sent_nor_counted(
    sandbox: RunningSandbox, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """The sent-mark is a Redis write; slow (appendfsync always on a busy disk), it can make
    the call late for its slot. Then nothing is sent, the mark and its attempt are undone, and
    the create comes back at once. Here the mark is made slow by 40 ms (a stand-in for the
    fsync), on a key limited to 5/s: 12.5 ms of lateness allowed."""
    from worker.steps import run_create

    settings = Settings(
        redis_url=redis_url,
        api_url=sandbox.url,
        key_prefix=key_prefix,
        accounts={CLIENT: Account(CLIENT, CLIENT, Secret(SECRET), rate=5)},
    )
    sandbox.reset()
    rt = Runtime.build(settings, redis_client=redis_client)
    rt.client.tokens.get(settings.account(CLIENT))  # the token's slot first
    submit(rt)
    transition = rt.store.transition

    def slow_mark(*args: Any, **kwargs: Any) -> Any:
        if (kwargs.get("fields") or {}).get("phase") == "sent":
            time.sleep(0.040)
        return transition(*args, **kwargs)

    rt.store.transition = slow_mark  # type: ignore[method-assign]
    time.sleep(0.3)  # the key goes idle: the create's slot is "now"
    assert run_create(rt, CLIENT, "r1") == "slot_missed"
    rec = record(rt)
    assert rec.phase == "" and rec.attempts == 0 and rec.state == State.CREATING
    assert "too late for its rate-limit slot" in rec.last_error
    assert rt.redis.zscore(rt.keys.due(CLIENT, "create"), "r1") is not None
    assert creates_seen(sandbox) == 0
    rt.store.transition = transition  # type: ignore[method-assign]
    assert run_create(rt, CLIENT, "r1") == "created"
    assert record(rt).attempts == 1 and creates_seen(sandbox) == 1
