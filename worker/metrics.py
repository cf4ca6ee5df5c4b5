"""Prometheus metrics of paypoll, and the functions the rest of the code records them with.

Every name has the ``paypoll_`` prefix, base units and ``_total`` on counters; labels are few-valued
(account alias, endpoint, outcome, state), never an id or a reference. Worker processes run in
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set by the fleet before the
processes start), so the fleet's exporter serves the sum of all of them.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# Buckets for HTTP latency against a 5 req/s API: from sub-millisecond (sandbox) to timeouts.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Limiter waits are bounded by max_wait (default 1 s).
WAIT_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 5.0)

API_CALL_SECONDS = Histogram(
    "paypoll_api_call_seconds",
    "Latency of calls to the payments API, by account, endpoint and outcome",
    ["account", "endpoint", "outcome"],
    buckets=LATENCY_BUCKETS,
)
API_CALLS = Counter(
    "paypoll_api_calls_total",
    "Calls to the payments API, by account, endpoint and outcome",
    ["account", "endpoint", "outcome"],
)
RATE_LIMITED = Counter(
    "paypoll_api_rate_limited_total", "429 answers received, by account", ["account"]
)
LIMITER_WAIT_SECONDS = Histogram(
    "paypoll_limiter_wait_seconds",
    "Time a caller slept for its rate-limit slot",
    ["account"],
    buckets=WAIT_BUCKETS,
)
LIMITER_GRANTED = Counter(
    "paypoll_limiter_granted_total", "Rate-limit slots granted", ["account"]
)
LIMITER_FAR = Counter(
    "paypoll_limiter_far_slots_total",
    "Slots further than max_wait: the job was rescheduled instead of waiting",
    ["account"],
)
LIMITER_PENALTIES = Counter(
    "paypoll_limiter_penalties_total",
    "429 penalties applied to a key (the whole fleet pauses)",
    ["account"],
)


def record_api_call(account: str, endpoint: str, outcome: str, seconds: float) -> None:
    """One call to the API ended with ``outcome`` (status code or error class) after ``seconds``."""
    API_CALL_SECONDS.labels(account, endpoint, outcome).observe(seconds)
    API_CALLS.labels(account, endpoint, outcome).inc()
    if outcome == "429":
        RATE_LIMITED.labels(account).inc()


def record_limiter_grant(account: str, waited: float) -> None:
    """A slot was granted to a caller that slept ``waited`` seconds for it."""
    LIMITER_GRANTED.labels(account).inc()
    LIMITER_WAIT_SECONDS.labels(account).observe(waited)


def record_far_slot(account: str) -> None:
    """A caller's slot was too far off; it was told to reschedule."""
    LIMITER_FAR.labels(account).inc()


def record_penalty(account: str) -> None:
    """A 429 penalty was applied to ``account``'s key."""
    LIMITER_PENALTIES.labels(account).inc()
