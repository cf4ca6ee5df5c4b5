"""The planner's gauges, read from Redis at each scrape (see worker/collectors.py).

Per account: the poll budget the sweeper allows now (``paypoll_poll_budget_per_second``), the
learned median completion age (``paypoll_completion_median_seconds``) and the learned weight
behind it, pending payments by age (``paypoll_pending_payments_by_age``, cumulative by ``max_age``:
the payments created at most that many seconds ago; not ``le``, which promtool reserves for
histograms), and the slots other software took
through ``worker.api_slot`` (``paypoll_shared_slots_total``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from worker.keys import Keys

PENDING_AGE_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400)


def _float(value: bytes | str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclass
class PlannerSnapshot:
    """What the planner gauges show, per account."""

    budget: dict[str, float] = field(default_factory=dict)
    median: dict[str, float] = field(default_factory=dict)
    learned: dict[str, float] = field(default_factory=dict)
    pending_by_age: dict[str, list[int]] = field(default_factory=dict)  # cumulative, + the total
    shared: dict[str, int] = field(default_factory=dict)


def read_planner(
    client: redis.Redis, keys: Keys, accounts: Sequence[str], now: float
) -> PlannerSnapshot:
    """One pipelined round trip for every account (``now``: the Redis clock)."""
    pipe = client.pipeline(transaction=False)
    for account in accounts:
        pipe.hmget(keys.plan(account), ["allowed", "median", "observed"])
        for le in PENDING_AGE_BUCKETS:
            pipe.zcount(keys.pending_age(account), now - le, "+inf")
        pipe.zcard(keys.pending_age(account))
        pipe.get(keys.shared_slots(account))
    replies = iter(pipe.execute())
    snap = PlannerSnapshot()
    for account in accounts:
        allowed, median, observed = next(replies)
        for name, value in (("budget", allowed), ("median", median), ("learned", observed)):
            number = _float(value)
            if number is not None:
                getattr(snap, name)[account] = number
        snap.pending_by_age[account] = [
            int(next(replies)) for _ in range(len(PENDING_AGE_BUCKETS) + 1)
        ]
        snap.shared[account] = int(next(replies) or 0)
    return snap


def _per_account(name: str, documentation: str, values: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["account"])
    for account, value in sorted(values.items()):
        family.add_metric([account], value)
    return family


def planner_families(snap: PlannerSnapshot) -> Iterator[Metric]:
    """The gauge and counter families of a snapshot."""
    yield _per_account(
        "paypoll_poll_budget_per_second",
        "Polls per second the planner lets a key spend now (its share, or the floor while "
        "creates wait, less what other software took)",
        snap.budget,
    )
    yield _per_account(
        "paypoll_completion_median_seconds",
        "Median age at which the key's payments complete, as learned (prior until data)",
        snap.median,
    )
    yield _per_account(
        "paypoll_completions_learned",
        "Completions behind the learned distribution (older ones fade)",
        snap.learned,
    )
    ages = GaugeMetricFamily(
        "paypoll_pending_payments_by_age",
        "Pending payments created at most max_age seconds ago (cumulative)",
        labels=["account", "max_age"],
    )
    edges = [*(f"{b:g}" for b in PENDING_AGE_BUCKETS), "+Inf"]
    for account, counts in sorted(snap.pending_by_age.items()):
        for le, count in zip(edges, counts, strict=True):
            ages.add_metric([account, le], count)
    yield ages
    shared = CounterMetricFamily(
        "paypoll_shared_slots",
        "Rate-limit slots other software took from the fleet's limiter (worker.api_slot)",
        labels=["account"],
    )
    for account, taken in sorted(snap.shared.items()):
        shared.add_metric([account], taken)
    yield shared
