"""The polling benchmark's arithmetic (benchmarks/polling_model.py, polling_report.py): the
models that tune its fixed and capped rows, and the figures and floors it reports. The runs
themselves are not tested here (a benchmark prints figures); what it computes from them is."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox_fixture import running_sandbox

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from polling_model import (
    LIGHT,
    Lifecycle,
    Saturation,
    fixed_interval_for,
    fixed_polls,
    planner_polls,
    share_for,
    sim_keyed,
)
from polling_report import RunResult, floor_rows, saturation_figures


def test_keyed_model_polls_on_the_interval_after_the_dispatch_delay() -> None:
    # One payment, created at 0 (its create takes the slot at 0), terminal at 10 s, polled
    # every 3 s with a 0.4 s dispatch: sent at 3.4, 6.8, 10.2, which sees it 0.2 s late.
    polls, delays = sim_keyed([10.0], lambda k: 3.0, first_delay=3.0, dispatch=0.4)
    assert polls == [3]
    assert delays[0] == pytest.approx(0.2)


def test_keyed_model_never_spends_more_than_the_rate() -> None:
    # 50 payments wanting a poll every 0.5 s (100/s) on one 5/s key for 200 s.
    offsets = [200.0] * 50
    polls, _ = sim_keyed(offsets, lambda k: 0.5, first_delay=0.5)
    span = 200.0 + 50 * 0.2 + 1
    assert sum(polls) <= 5 * span
    assert sum(polls) >= 5 * (200.0 - 50 * 0.2)  # and it is saturated: nearly all of it
    # Two keys split the payments and double the capacity.
    polls2, _ = sim_keyed(offsets, lambda k: 0.5, first_delay=0.5, keys=2)
    assert sum(polls2) > 1.8 * sum(polls)


def test_fixed_interval_is_the_smallest_within_the_budget() -> None:
    offsets = LIGHT["uniform"].offsets()
    interval = fixed_interval_for(offsets, 215)
    assert fixed_polls(offsets, interval) <= 215
    assert fixed_polls(offsets, interval - 0.05) > 215 - 5  # bisection to within a hair


def test_planner_model_spends_its_share_or_the_min_gap() -> None:
    offsets = [100.0] * 3  # three payments pending ~100 s on an idle key
    # Min gap 1 s binds: each polled every second, 3 polls/s, whatever the share above 0.6.
    assert planner_polls(offsets, 0.9) == pytest.approx(300, rel=0.02)
    # Share 0.1 of 5/s: 0.5 polls/s.
    assert planner_polls(offsets, 0.1) == pytest.approx(50, rel=0.02)
    share = share_for(offsets, 100)
    assert planner_polls(offsets, share) == pytest.approx(100, rel=0.02)
    assert share_for(offsets, 10_000) == 1.0  # more than it can spend: the whole rate


def test_lifecycle_offsets_are_what_the_sandbox_draws() -> None:
    """The model tunes on the drawn lifecycle: the real sandbox must draw the same one."""
    lifecycle = Lifecycle(
        "t", payments=30, keys=1, pay_after=(5, 60), tail=(0.3, 100, 200), stay_pending=0.2
    )
    with running_sandbox(rate=5, **lifecycle.sandbox_kwargs()) as sb:
        ids = sb.seed("sandbox-client", lifecycle.payments)
        payments = sb.stats()["payments"]
    got = [payments[i]["planned_terminal_at"] - payments[i]["created_at"] for i in ids]
    assert got == pytest.approx(lifecycle.offsets())
    assert any(100 <= o <= 200 for o in got)  # the tail is there


def payment(first: float | None, last: float | None, gap: float) -> dict[str, Any]:
    return {"first_poll_at": first, "last_poll_at": last, "max_poll_gap": gap}


def test_saturation_figures_count_every_wait_for_a_poll() -> None:
    sat = Saturation(payments=4, keys=1, window=100.0)
    start = {"now": 1000.0, "clients": {"c": {"polls": 10}}}
    end = {
        "now": 1100.0,
        "clients": {"c": {"polls": 460, "rate_limited": 0, "max_accepted_in_1s": 5}},
        "payments": {
            "never": payment(None, None, 0.0),  # waited the whole run: 1100 - 995
            "late-first": payment(1040.0, 1090.0, 20.0),  # fleet start to first poll: 45
            "gap": payment(996.0, 1095.0, 60.0),  # its largest gap
            "stale": payment(996.0, 1010.0, 5.0),  # last poll to the end: 90
        },
    }
    result = RunResult("planner", "planner", 4.5, stats=end, start_stats=start, launched_at=995)
    f = saturation_figures(result, sat)
    assert f["polls_per_s_key"] == pytest.approx(4.5)
    assert f["of_budget"] == pytest.approx(1.0)
    assert f["never"] == 1
    assert f["gap_max"] == pytest.approx(105.0)
    assert f["gap_p50"] == pytest.approx(60.0)
    assert f["gap_p99"] == pytest.approx(105.0)
    assert f["gap_floor"] == pytest.approx(1.5 * 4 / 4.5)
    assert math.isnan(f["minute_min"])  # no per-second counts: no whole minute to show


def test_floor_rows_judge_the_issue_floors() -> None:
    def light(p50: float, p95: float, polls: int) -> dict[str, Any]:
        # percentile by nearest rank over 20 values: 10th is p50, 19th is p95
        delays = [p50] * 10 + [p50] * 8 + [p95] * 2
        return {"delays": delays, "polls": polls, "limited": 0}

    figures = {
        "planner": light(0.8, 2.0, 500),
        "fixed": light(3.0, 6.0, 200),
        "capped": light(2.0, 4.0, 204),
    }
    rows = {r[0]: r for r in floor_rows("uniform", figures, premerge=False)}
    assert rows["uniform, planner: detection p50 / p95"][3] == "PASS"
    assert rows["uniform, capped planner vs fixed"][3] == "PASS"
    assert rows["uniform, capped planner spent the fixed interval's polls"][3] == "PASS"
    assert rows["uniform: 429s, every run"][3] == "PASS"
    # Long tail wants 30% off the fixed p95: 4.0 vs 6.0 is 33% off; 4.5 is not enough.
    rows = {r[0]: r for r in floor_rows("long_tail", figures, premerge=False)}
    assert rows["long_tail, capped planner vs fixed"][3] == "PASS"
    figures["capped"] = light(2.0, 4.5, 260)
    figures["fixed"]["limited"] = 1
    rows = {r[0]: r for r in floor_rows("long_tail", figures, premerge=True)}
    note = " (pre-merge: the planner did not run)"
    assert rows[f"long_tail, capped planner vs fixed{note}"][3] == "FAIL"
    assert rows[f"long_tail, capped planner spent the fixed interval's polls{note}"][3] == "FAIL"
    assert rows["long_tail: 429s, every run"][1:] == ("1", "0", "FAIL")
