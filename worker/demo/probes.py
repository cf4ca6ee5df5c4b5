"""What the demo reads while it runs: the sandbox's admin stats and the fleet's /metrics.

The sandbox counts what really reached the API (per API key: requests, 429s, the busiest
1-second window, creates per reference_id); the fleet's exporter says how long calls took.
Quantiles come from the ``paypoll_api_call_seconds`` histogram the way Prometheus'
``histogram_quantile`` computes them (linear within a bucket), so they are bucket estimates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import requests

HTTP_TIMEOUT = 3.0  # seconds for one admin or metrics request on loopback

_BUCKET = re.compile(r"^(?P<name>[a-z_]+)_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LE = re.compile(r'(?:^|,)le="(?P<le>[^"]+)"')


def sandbox_stats(url: str, *, payments: bool = False, times: bool = False) -> dict[str, Any]:
    """The sandbox's ``GET /_admin/stats`` document (without per-payment data by default; with
    each key's accepted arrival times when ``times``)."""
    query = f"?payments={int(payments)}&times={int(times)}"
    answer = requests.get(f"{url}/_admin/stats{query}", timeout=HTTP_TIMEOUT)
    answer.raise_for_status()
    data: dict[str, Any] = answer.json()
    return data


def accepted_in_last_second(times: list[float], now: float) -> int:
    """How many of the ascending arrival ``times`` fall in the window (now - 1 s, now]."""
    count = 0
    for at in reversed(times):
        if at <= now - 1.0:
            break
        if at <= now:
            count += 1
    return count


def metrics_text(url: str) -> str:
    """The exposition text the fleet serves at ``url``."""
    answer = requests.get(url, timeout=HTTP_TIMEOUT)
    answer.raise_for_status()
    return answer.text


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) of histogram ``name`` summed over all its label sets,
    sorted by bound, from Prometheus exposition ``text``."""
    sums: dict[float, float] = {}
    for line in text.splitlines():
        match = _BUCKET.match(line)
        if not match or match.group("name") != name:
            continue
        le = _LE.search(match.group("labels"))
        if le is None:
            continue
        bound = math.inf if le.group("le") == "+Inf" else float(le.group("le"))
        sums[bound] = sums.get(bound, 0.0) + float(match.group("value"))
    return sorted(sums.items())


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile (0..1) of cumulative ``buckets``, as Prometheus' histogram_quantile:
    linear interpolation inside the bucket holding the rank; None when there are no
    observations; the highest finite bound when the rank falls in the +Inf bucket."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def counter_total(text: str, name: str) -> float:
    """Sum of counter ``name`` over all its label sets in exposition ``text``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(None, 1)[-1])
    return total
