"""PaymentStore against a real Redis: idempotent submit, forward-only moves, guards, schedule."""

from __future__ import annotations

import pytest
import redis

from worker.errors import ValidationError
from worker.keys import Keys
from worker.store import PaymentSpec, PaymentStore, State


@pytest.fixture
def store(redis_client: redis.Redis, keys: Keys) -> PaymentStore:
    return PaymentStore(redis=redis_client, keys=keys, events_maxlen=1000)


def spec(ref: str = "r1", account: str = "acme", amount: str = "10") -> PaymentSpec:
    return PaymentSpec(
        account=account,
        reference_id=ref,
        amount=amount,
        currency="USD",
        redirect_url="https://shop.test/ok",
    )


def events(store: PaymentStore) -> list[dict[str, str]]:
    entries = store.redis.xrange(store.keys.events())
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def test_submit_records_queued_with_its_create_due_now(store: PaymentStore) -> None:
    assert store.submit(spec()) is True
    record = store.get("acme", "r1")
    assert record is not None
    assert (record.state, record.amount, record.attempts, record.polls) == ("queued", "10", 0, 0)
    due = store.redis.zscore(store.keys.due("acme", "create"), "r1")
    assert due is not None and abs(due - store.now()) < 2
    assert store.accounts() == ["acme"]
    assert events(store)[-1]["to"] == "queued"


def test_submit_is_idempotent_and_refuses_a_reused_reference(store: PaymentStore) -> None:
    assert store.submit(spec()) is True
    assert store.submit(spec()) is False
    with pytest.raises(ValidationError) as err:
        store.submit(spec(amount="11"))
    assert err.value.field == "reference_id" and "different details" in err.value.reason
    assert store.count_by_state()["queued"] == 1
    results = store.submit_many([spec("r1"), spec("r2"), spec("r1", amount="12")])
    assert results[0] is False and results[1] is True
    assert isinstance(results[2], ValidationError)


def test_moves_only_forward(store: PaymentStore) -> None:
    store.submit(spec())
    assert store.transition("acme", "r1", State.CREATING, next_step="create").moved
    assert store.transition("acme", "r1", State.PENDING, next_step="track").moved
    paid = store.transition("acme", "r1", State.PAID, increments={"polls": 1})
    assert paid.moved and paid.previous == "pending" and paid.polls == 1
    back = store.transition("acme", "r1", State.PENDING, next_step="track")
    assert not back.moved and back.previous == "paid"
    record = store.get("acme", "r1")
    assert record is not None and record.state == "paid" and record.terminal_at is not None
    # A final payment has no schedule entry left (invariant 4 concerns active ones only).
    for step in ("create", "track"):
        assert store.redis.zscore(store.keys.due("acme", step), "r1") is None
        assert store.redis.zscore(store.keys.inflight("acme", step), "r1") is None
    assert store.redis.smembers(store.keys.by_state("acme", "paid")) == {b"r1"}
    assert store.redis.smembers(store.keys.by_state("acme", "pending")) == set()
    assert [e["to"] for e in events(store)] == ["queued", "creating", "pending", "paid"]


def test_guard_makes_concurrent_deliveries_lose(store: PaymentStore) -> None:
    store.submit(spec())
    first = store.transition(
        "acme",
        "r1",
        State.CREATING,
        sources=[State.QUEUED, State.CREATING],
        guard=("phase", ""),
        fields={"phase": "sent"},
    )
    second = store.transition(
        "acme",
        "r1",
        State.CREATING,
        sources=[State.QUEUED, State.CREATING],
        guard=("phase", ""),
        fields={"phase": "sent"},
    )
    assert first.moved and not second.moved


def test_operator_moves_are_separate(store: PaymentStore) -> None:
    store.submit(spec())
    store.transition("acme", "r1", State.CREATING)
    store.transition("acme", "r1", State.CREATE_UNKNOWN)
    assert not store.transition("acme", "r1", State.PENDING).moved
    moved = store.transition(
        "acme", "r1", State.PENDING, operator=True, next_step="track", fields={"payment_id": "pr_1"}
    )
    assert moved.moved and moved.previous == "create_unknown"


def test_claim_respects_the_budget_prefers_creates_and_recovers_lost_leases(
    store: PaymentStore,
) -> None:
    for i in range(5):
        store.submit(spec(f"c{i}"))
    for i in range(5):
        store.register_tracking("acme", f"t{i}", f"pr_{i}")
    claim = store.claim_due("acme", budget=7, lease=0.3, batch=100)
    assert claim.creates == [f"c{i}" for i in range(5)]
    assert len(claim.tracks) == 2
    again = store.claim_due("acme", budget=7, lease=0.3, batch=100)
    assert again.creates == [] and again.tracks == []  # budget used up by the leases
    # A worker finishing a step frees its lease.
    store.transition("acme", "c0", State.CREATING, next_step="create", delay=60)
    assert store.claim_due("acme", budget=7, lease=0.3, batch=100).tracks == ["t2"]
    # Leases that run out (a killed worker) come back as due and are dispatched again.
    deadline = store.now() + 0.4
    while store.now() < deadline:
        pass
    recovered = store.claim_due("acme", budget=100, lease=30, batch=100)
    assert recovered.recovered == 7
    assert sorted(recovered.creates) == ["c1", "c2", "c3", "c4"]
    assert sorted(recovered.tracks) == ["t0", "t1", "t2", "t3", "t4"]


def test_register_tracking_conflicts_and_listing(store: PaymentStore) -> None:
    assert store.register_tracking("acme", "x", "pr_1") is True
    assert store.register_tracking("acme", "x", "pr_1") is False
    with pytest.raises(ValidationError):
        store.register_tracking("acme", "x", "pr_2")
    store.submit(spec("y", account="globex"))
    assert [r.reference_id for r in store.iter_records()] == ["x", "y"]
    assert [r.reference_id for r in store.iter_records(state="queued")] == ["y"]
    assert [r.account for r in store.find("x")] == ["acme"]
    record = store.get("acme", "x")
    assert record is not None and record.created_at is not None and record.payment_id == "pr_1"
