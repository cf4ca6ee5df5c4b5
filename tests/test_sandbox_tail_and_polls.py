"""The sandbox's long-tail lifecycle (--pay-after-tail), its poll figures (per payment and per
client) and POST /_admin/seed: pure functions, then the real process over HTTP."""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable

import pytest
import requests

from tests.sandbox_fixture import RunningSandbox, sandbox_factory, sandbox_fixture
from worker.sandbox import cli
from worker.sandbox.config import OUTCOME_WEIGHTS
from worker.sandbox.lifecycle import LifecycleSettings, Plan, draw_plan
from worker.sandbox.notation import parse_tail
from worker.sandbox.stats import PerSecond

__all__ = ["sandbox_factory"]  # re-exported fixture, used below

Factory = Callable[..., RunningSandbox]
# One sandbox for the refusal cases: a refused seed changes nothing.
refusing = sandbox_fixture(scope="module", client=["a:sa"])
BODY = {"amount": "100", "currency": "USD", "redirect_url": "https://shop.example/thanks"}


def lifecycle(tail: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> LifecycleSettings:
    return LifecycleSettings(
        pay_after=(5.0, 60.0),
        outcomes=dict(OUTCOME_WEIGHTS),
        stay_pending=0.2,
        expire_after=450.0,
        unknown_status=0.1,
        unknown_status_name="processing",
        pay_after_tail=tail,
    )


def plans(settings: LifecycleSettings, n: int, seed: int = 3) -> list[Plan]:
    return [
        draw_plan(settings, seed=seed, generation=0, index=i, created_at=1000.0) for i in range(n)
    ]


# ---------------------------------------------------------------- the draw
def test_no_tail_draws_what_the_four_number_draw_did() -> None:
    """Plans drawn before the tail existed are unchanged: the tail's number is drawn last."""
    settings = lifecycle()
    for i, plan in enumerate(plans(settings, 300)):
        rng = random.Random(f"paypoll-sandbox/3/0/{i}")
        stays, _pick, delay, unknown = (rng.random() for _ in range(4))
        if stays < settings.stay_pending:
            assert (plan.outcome, plan.terminal_at) == ("expired", 1450.0)
        else:
            assert plan.terminal_at == pytest.approx(1000.0 + 5.0 + 55.0 * delay)
        assert (plan.unknown_from is not None) == (unknown < settings.unknown_status)


def test_tail_moves_only_its_share_of_payers_and_nothing_else() -> None:
    base = plans(lifecycle(), 2000)
    tailed = plans(lifecycle((0.25, 180.0, 420.0)), 2000)
    payers = [i for i, p in enumerate(base) if p.terminal_at != 1450.0]
    moved = [i for i in payers if tailed[i].terminal_at != base[i].terminal_at]
    # Outcomes and who stays pending never change with the tail (one draw per number).
    assert [p.outcome for p in tailed] == [p.outcome for p in base]
    for i, (b, t) in enumerate(zip(base, tailed, strict=True)):
        if i not in payers:
            assert t == b  # stays pending until it expires, tail or not
    for i in moved:
        assert 180.0 <= tailed[i].terminal_at - 1000.0 <= 420.0
    for i in set(payers) - set(moved):
        assert 5.0 <= tailed[i].terminal_at - 1000.0 <= 60.0
    assert 0.21 <= len(moved) / len(payers) <= 0.29
    # Everyone in the tail with share 1; the stays still expire at expire_after.
    everyone = plans(lifecycle((1.0, 180.0, 420.0)), 2000)
    assert all(180.0 <= everyone[i].terminal_at - 1000.0 <= 420.0 for i in payers)
    assert all(everyone[i] == base[i] for i in range(2000) if i not in payers)


def test_one_payments_draw_never_depends_on_another() -> None:
    settings = lifecycle((0.3, 100.0, 200.0))
    together = plans(settings, 50)
    alone = [
        draw_plan(settings, seed=3, generation=0, index=i, created_at=1000.0)
        for i in reversed(range(50))
    ]
    assert together == list(reversed(alone))


def test_parse_tail() -> None:
    assert parse_tail("0.2:180:480") == (0.2, 180.0, 480.0)
    for bad, reason in (
        ("0.2:180", "SHARE:MIN:MAX"),
        ("0.2", "SHARE:MIN:MAX"),
        ("1.5:1:2", r"within \[0, 1\]"),
        ("0.2:9:3", "MIN <= MAX"),
        ("0.2:1:2:3", "MIN:MAX"),
    ):
        with pytest.raises(ValueError, match=reason):
            parse_tail(bad)


def test_cli_option_reaches_the_config_and_refuses_bad_values() -> None:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    config = cli.config_from_args(parser.parse_args(["--pay-after-tail", "0.3:120:400"]))
    assert config.pay_after_tail == (0.3, 120.0, 400.0)
    assert config.public()["pay_after_tail"] == [0.3, 120.0, 400.0]
    assert cli.config_from_args(parser.parse_args([])).pay_after_tail == (0.0, 0.0, 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--pay-after-tail", "2:1:3"])


def test_per_second_counts_are_bounded_and_placed_on_the_clock() -> None:
    counts = PerSecond(kept=5)
    for at in (100.2, 100.9, 102.5, 101.1):  # the last arrives judged after a later one
        counts.add(at)
    assert counts.public() == {"start": 100, "counts": [2, 1, 1]}
    counts.add(106.0)  # seconds 103-105 had none; only the last 5 seconds are kept
    assert counts.public() == {"start": 102, "counts": [1, 0, 0, 0, 1]}
    counts.add(90.0)  # older than what is kept: dropped, not misplaced
    assert sum(counts.public()["counts"]) == 2
    counts.add(1_000_000.0)  # a long silence costs no more than `kept` entries
    assert counts.public() == {"start": 999_996, "counts": [0, 0, 0, 0, 1]}


# ---------------------------------------------------------------- over HTTP
def bearer(sb: RunningSandbox, client_id: str) -> dict[str, str]:
    response = requests.post(
        f"{sb.url}/oauth/token",
        auth=(client_id, sb.clients[client_id]),
        data={"grant_type": "client_credentials"},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def test_tail_payments_finish_in_the_tail_range(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=1000, pay_after="50:60", pay_after_tail="1:0.2:0.4", seed=4)
    headers = bearer(sb, "sandbox-client")
    for _ in range(5):
        response = requests.post(
            f"{sb.url}/payments/request", json=BODY, headers=headers, timeout=5
        )
        assert response.status_code == 200
    stats = sb.stats()
    assert stats["config"]["pay_after_tail"] == [1.0, 0.2, 0.4]
    for payment in stats["payments"].values():
        assert 0.2 <= payment["planned_terminal_at"] - payment["created_at"] <= 0.4


def test_poll_figures_per_payment_and_per_client(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=1000, pay_after="100:100", client=["a:sa", "b:sb"])
    headers = bearer(sb, "a")
    pid = requests.post(f"{sb.url}/payments/request", json=BODY, headers=headers, timeout=5)
    pid = pid.json()["id"]
    url = f"{sb.url}/payments/request/{pid}"
    before = time.time()
    assert requests.get(url, headers=headers, timeout=5).status_code == 200
    time.sleep(0.3)  # the gap this test measures, not a wait for a condition
    assert requests.get(url, headers=headers, timeout=5).status_code == 200
    assert requests.get(url, headers=headers, timeout=5).status_code == 200
    after = time.time()
    # Neither another client's GET (404) nor an unknown id counts as a poll.
    assert requests.get(url, headers=bearer(sb, "b"), timeout=5).status_code == 404
    unknown = f"{sb.url}/payments/request/pr_unknown"
    assert requests.get(unknown, headers=headers, timeout=5).status_code == 404

    stats = sb.stats(times=True)
    payment = stats["payments"][pid]
    assert payment["polls"] == 3
    assert before <= payment["first_poll_at"] < payment["last_poll_at"] <= after
    assert 0.3 <= payment["max_poll_gap"] <= payment["last_poll_at"] - payment["first_poll_at"]
    client = stats["clients"]["a"]
    assert client["polls"] == 3
    assert client["first_poll_at"] == payment["first_poll_at"]
    assert client["last_poll_at"] == payment["last_poll_at"]
    per_second = client["polls_per_second"]
    assert sum(per_second["counts"]) == 3
    assert per_second["start"] == math.floor(payment["first_poll_at"])
    assert per_second["start"] + len(per_second["counts"]) - 1 == math.floor(after)
    assert stats["clients"]["b"]["polls"] == 0
    # Without ?times=1 the per-second counts stay out of the document.
    assert "polls_per_second" not in sb.stats(payments=False)["clients"]["a"]


def test_a_payment_never_polled_twice_has_no_gap(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=1000)
    headers = bearer(sb, "sandbox-client")
    pid = requests.post(f"{sb.url}/payments/request", json=BODY, headers=headers, timeout=5)
    pid = pid.json()["id"]
    payment = sb.stats()["payments"][pid]
    assert (payment["polls"], payment["first_poll_at"], payment["max_poll_gap"]) == (0, None, 0)
    requests.get(f"{sb.url}/payments/request/{pid}", headers=headers, timeout=5)
    payment = sb.stats()["payments"][pid]
    assert payment["first_poll_at"] == payment["last_poll_at"]
    assert payment["max_poll_gap"] == 0


def test_seed_makes_payments_outside_the_api(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=5, pay_after="3600:7200", client=["a:sa", "b:sb"], seed=2)
    ids = sb.seed("a", 2000, prefix="sat-")
    assert len(set(ids)) == 2000
    stats = sb.stats()
    assert stats["payments_count"] == 2000
    assert "a" not in stats["clients"]  # no request was counted, none was limited
    refs = stats["creates_by_reference"]["a"]
    assert refs == {f"sat-{i}": 1 for i in range(2000)}
    assert {p["status"] for p in stats["payments"].values()} == {"pending"}
    # The owner can poll them through the (still 5/s) API; another key cannot see them.
    headers = bearer(sb, "a")
    answer = requests.get(f"{sb.url}/payments/request/{ids[7]}", headers=headers, timeout=5)
    assert answer.status_code == 200
    assert answer.json()["reference_id"] == "sat-7"
    other = requests.get(f"{sb.url}/payments/request/{ids[7]}", headers=bearer(sb, "b"), timeout=5)
    assert other.status_code == 404
    # Seeded like creates: the same ids and plans as a sandbox that created them one by one.
    twin = sandbox_factory(rate=1000, pay_after="3600:7200", client=["a:sa"], seed=2)
    twin_headers = bearer(twin, "a")
    made = [
        requests.post(f"{twin.url}/payments/request", json=BODY, headers=twin_headers, timeout=5)
        for _ in range(3)
    ]
    assert [m.json()["id"] for m in made] == ids[:3]
    twin_payments = twin.stats()["payments"]
    for pid in ids[:3]:
        offset = (
            stats["payments"][pid]["planned_terminal_at"] - stats["payments"][pid]["created_at"]
        )
        twin_offset = twin_payments[pid]["planned_terminal_at"] - twin_payments[pid]["created_at"]
        assert offset == pytest.approx(twin_offset)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"client_id": "nobody", "count": 3}, "client_id"),
        ({"count": 3}, "client_id"),
        ({"client_id": "a", "count": 0}, "count"),
        ({"client_id": "a", "count": "3"}, "count"),
        ({"client_id": "a", "count": True}, "count"),
        ({"client_id": "a", "count": 100_001}, "count"),
        ({"client_id": "a", "count": 3, "prefix": 7}, "prefix"),
    ],
)
def test_seed_refuses_bad_bodies_naming_the_field(
    refusing: RunningSandbox, body: dict[str, object], field: str
) -> None:
    sb = refusing
    answer = requests.post(f"{sb.url}/_admin/seed", json=body, timeout=5)
    assert answer.status_code == 400
    assert answer.json()["message"].startswith(f"{field}:")
    assert sb.stats()["payments_count"] == 0
