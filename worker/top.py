"""What `paypoll top` shows, read from a running deployment: its Redis and its fleets' /metrics.

From Redis (one pipelined read, :func:`read_top_store`): payments per account and state, the
scheduled steps and the most overdue one, queue depths, workers alive, and the detection delay's
bound now (a pending payment that completes this instant is seen by its next poll: the latest
next poll of each key bounds how long that takes). From each fleet's /metrics (summed over
fleets): API calls and 429s per account, whose difference between two samples gives requests/s,
the configured limits, and the ``paypoll_detection_delay_bound_seconds`` histogram when the fleet
exports it (its p95 over the sample window). Nothing here writes anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from worker.collectors import QueueReader, StoreSnapshot, read_store
from worker.keys import Keys
from worker.store.states import ALL_STATES

SCRAPE_TIMEOUT = 3.0  # seconds for one fleet's /metrics
DETECTION_HISTOGRAM = "paypoll_detection_delay_bound_seconds"


@dataclass(frozen=True)
class StoreView:
    """Redis's part of a sample."""

    snapshot: StoreSnapshot
    payments: dict[str, dict[str, int]]  # account -> state -> count (every state)
    next_poll_within: dict[str, float]  # account -> seconds to its latest scheduled poll


def read_top_store(
    client: redis.Redis,
    keys: Keys,
    namespace: str,
    queues: Sequence[str],
    accounts: Iterable[str],
    queue_reader: QueueReader | None = None,
) -> StoreView:
    """The store's part of `top`: :func:`read_store` plus per-state counts and the latest poll;
    the queues from ``queue_reader`` when they live apart (``PAYPOLL_BROKER_URL``)."""
    snapshot = read_store(
        client, keys, namespace, () if queue_reader else queues, accounts=accounts
    )
    if queue_reader is not None:
        snapshot = replace(snapshot, queues=queue_reader(queues))
    names = sorted({account for account, _ in snapshot.steps})
    pipe = client.pipeline(transaction=False)
    for name in names:
        for state in ALL_STATES:
            pipe.scard(keys.by_state(name, state))
        pipe.zrange(keys.due(name, "track"), -1, -1, withscores=True)
    replies = iter(pipe.execute())
    payments: dict[str, dict[str, int]] = {}
    within: dict[str, float] = {}
    for name in names:
        payments[name] = {state.value: int(next(replies)) for state in ALL_STATES}
        latest = next(replies)
        within[name] = max(0.0, float(latest[0][1]) - snapshot.now) if latest else 0.0
    return StoreView(snapshot=snapshot, payments=payments, next_poll_within=within)


@dataclass
class MetricsSample:
    """The counters `top` needs from the fleets' /metrics, summed over fleets."""

    at: float  # monotonic seconds when scraped
    calls: dict[str, float] = field(default_factory=dict)  # account -> API calls so far
    rate_limited: dict[str, float] = field(default_factory=dict)  # account -> 429s so far
    limits: dict[str, float] = field(default_factory=dict)  # account -> requests/s allowed
    delay_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    reached: list[str] = field(default_factory=list)  # the URLs that answered
    failed: dict[str, str] = field(default_factory=dict)  # URL -> why not


def scrape_fleets(urls: Sequence[str], *, timeout: float = SCRAPE_TIMEOUT) -> MetricsSample:
    """One sample of every fleet's /metrics (an unreachable one is listed in ``failed``)."""
    sample = MetricsSample(at=time.monotonic())
    for url in urls:
        try:
            answer = requests.get(url, timeout=timeout)
            answer.raise_for_status()
        except requests.RequestException as exc:
            sample.failed[url] = type(exc).__name__
            continue
        sample.reached.append(url)
        for family in text_string_to_metric_families(answer.text):
            for s in family.samples:
                account = s.labels.get("account", "")
                if s.name == "paypoll_api_calls_total":
                    sample.calls[account] = sample.calls.get(account, 0.0) + s.value
                elif s.name == "paypoll_api_rate_limited_total":
                    sample.rate_limited[account] = sample.rate_limited.get(account, 0.0) + s.value
                elif s.name == "paypoll_account_rate_limit":
                    sample.limits[account] = s.value  # configured: the same in every fleet
                elif s.name == f"{DETECTION_HISTOGRAM}_bucket":
                    le = float(s.labels["le"])
                    sample.delay_buckets[le] = sample.delay_buckets.get(le, 0.0) + s.value
    return sample


def _per_second(
    now: Mapping[str, float], before: Mapping[str, float], seconds: float
) -> dict[str, float]:
    """Rates from two counter samples; a counter that went down (its fleet restarted) counts
    from 0."""
    rates = {}
    for key, value in now.items():
        delta = value - before.get(key, 0.0)
        rates[key] = (value if delta < 0 else delta) / seconds if seconds > 0 else 0.0
    return rates


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative ``le -> count`` (None: no observation)."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return lower_le + (le - lower_le) * share
        lower_le, lower_count = le, count
    return lower_le


def build_report(
    store: StoreView,
    before: MetricsSample | None,
    now: MetricsSample | None,
    *,
    limits: Mapping[str, float],
) -> dict[str, Any]:
    """The JSON-ready report `top` shows: per key, payments, queues, the detection delay."""
    seconds = (now.at - before.at) if now is not None and before is not None else 0.0
    rps = _per_second(now.calls, before.calls, seconds) if now and before else {}
    r429 = _per_second(now.rate_limited, before.rate_limited, seconds) if now and before else {}
    snap = store.snapshot
    accounts: dict[str, Any] = {}
    for name in sorted(store.payments):
        overdue = [s.overdue_seconds for (a, _), s in snap.steps.items() if a == name]
        accounts[name] = {
            "requests_per_second": round(rps[name], 2) if name in rps else None,
            "limit": limits.get(name, now.limits.get(name) if now else None),
            "rate_limited_total": int(now.rate_limited.get(name, 0)) if now else None,
            "rate_limited_per_second": round(r429[name], 2) if name in r429 else None,
            "payments": store.payments[name],
            "oldest_due_step_seconds": round(max(overdue, default=0.0), 3),
            "detection_delay_bound_seconds": round(store.next_poll_within[name], 3),
        }
    window: dict[float, float] = {}
    if now is not None:
        old = before.delay_buckets if before is not None else {}
        window = {le: count - old.get(le, 0.0) for le, count in now.delay_buckets.items()}
    p95 = histogram_quantile(0.95, window) if window else None
    states = {
        state.value: sum(p[state.value] for p in store.payments.values()) for state in ALL_STATES
    }
    return {
        "sample_seconds": round(seconds, 3),
        "workers_alive": snap.workers_alive,
        "queues": {queue: depth.ready for queue, depth in snap.queues.items()},
        "payments": states,
        "oldest_due_step_seconds": round(
            max((s.overdue_seconds for s in snap.steps.values()), default=0.0), 3
        ),
        "detection_delay_bound_seconds": round(
            max(store.next_poll_within.values(), default=0.0), 3
        ),
        "detection_delay_observed_p95_seconds": None if p95 is None else round(p95, 3),
        "accounts": accounts,
        "metrics": {
            "reached": list(now.reached) if now else [],
            "failed": dict(now.failed) if now else {},
        },
    }
