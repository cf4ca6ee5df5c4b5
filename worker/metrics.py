"""Prometheus metrics of paypoll, and the functions the rest of the code records them with.

Every name has the ``paypoll_`` prefix, base units and ``_total`` on counters; labels are few-valued
(account alias, endpoint, outcome, state, actor, reason), never an id or a reference. Worker
processes run in prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set by the
fleet before the processes start, see :mod:`worker.exporter`), so the fleet's exporter serves the
sum of all of them. Gauges that describe shared state (backlog, queue depth, workers alive) are not
here: they are read from Redis at scrape time by :mod:`worker.collectors`.

This module only defines metrics and records into them; it opens nothing and reads no environment
variable itself (prometheus-client reads ``PROMETHEUS_MULTIPROC_DIR`` when first imported).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)
# The labelled children of the per-call metrics, by (metric, label values): ``labels()`` takes
# a lock and validates its arguments each time, about 2 us, several times per API call (issue
# 14); a dict lookup is a tenth of that. Safe because no metric's children are ever removed.
_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def _child(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, looked up once per label combination."""
    key = (id(metric), values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


# Buckets for HTTP latency against a 5 req/s API: from sub-millisecond (sandbox) to timeouts.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Limiter waits are bounded by max_wait (default 1 s).
WAIT_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 5.0)
# Submit to terminal: seconds (sandbox, instant payers) up to the default 24 h tracking timeout.
TERMINAL_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 43200, 86400)
# Polls per payment: backoff of x1.6 capped at 60 s makes ~1,450 polls in 24 h at most.
POLL_COUNT_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 377, 987, 2584)
# One job is one API call plus Redis work, or a limiter wait of up to max_wait.
JOB_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

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
LIMITER_GRANTED = Counter("paypoll_limiter_granted_total", "Rate-limit slots granted", ["account"])
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
TOKEN_FAILURES = Counter(
    "paypoll_token_failures_total",
    "Failed attempts to obtain an access token, by account and reason (status or error class)",
    ["account", "reason"],
)
TRANSITIONS = Counter(
    "paypoll_payment_transitions_total",
    "Payments entering a state, by account and the state entered",
    ["account", "state"],
)
TERMINAL_SECONDS = Histogram(
    "paypoll_payment_terminal_seconds",
    "Time from submit to a terminal state, by account and terminal state",
    ["account", "state"],
    buckets=TERMINAL_BUCKETS,
)
POLLS_AT_TERMINAL = Histogram(
    "paypoll_payment_polls",
    "Polls a payment needed before reaching its terminal state",
    ["account", "state"],
    buckets=POLL_COUNT_BUCKETS,
)
UNKNOWN_STATUSES = Counter(
    "paypoll_unknown_statuses_total",
    "Payment statuses the API returned that paypoll does not know (tolerated, kept polling)",
    ["account"],
)
# Seconds: a poll every min_gap bounds it near 1 s; saturation and backoff reach minutes.
DETECTION_BUCKETS = (0.25, 0.5, 1, 1.5, 2, 2.5, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 900, 3600)
DETECTION_BOUND_SECONDS = Histogram(
    "paypoll_detection_delay_bound_seconds",
    "Upper bound of how late a final state was noticed: time from the last poll that saw the "
    "payment pending (or its create) to the poll that saw it final",
    ["account"],
    buckets=DETECTION_BUCKETS,
)
JOBS = Counter(
    "paypoll_jobs_total",
    "Actor jobs finished, by actor and outcome (ok, or what ended them)",
    ["actor", "outcome"],
)
JOB_SECONDS = Histogram(
    "paypoll_job_seconds",
    "Duration of actor jobs, by actor and outcome",
    ["actor", "outcome"],
    buckets=JOB_BUCKETS,
)
# livesum: the exporter sums live processes only; a dead process's file is removed by
# worker.exporter.mark_process_dead, so a crashed job does not stay "in progress" forever.
JOBS_IN_PROGRESS = Gauge(
    "paypoll_jobs_in_progress",
    "Actor jobs running now, summed over live worker processes",
    ["actor"],
    multiprocess_mode="livesum",
)

OUTCOME_OK = "ok"  # the outcome label of a job that returned normally (and said nothing more)
OUTCOME_ERROR = "error"  # the outcome label of a job that raised


def record_api_call(account: str, endpoint: str, outcome: str, seconds: float) -> None:
    """One call to the API ended with ``outcome`` (status code or error class) after ``seconds``."""
    _child(API_CALL_SECONDS, account, endpoint, outcome).observe(seconds)
    _child(API_CALLS, account, endpoint, outcome).inc()
    if outcome == "429":
        RATE_LIMITED.labels(account).inc()


def record_limiter_grant(account: str, waited: float) -> None:
    """A slot was granted to a caller that slept ``waited`` seconds for it."""
    _child(LIMITER_GRANTED, account).inc()
    _child(LIMITER_WAIT_SECONDS, account).observe(waited)


REPLICA_WAIT_SECONDS = Histogram(
    "paypoll_replica_wait_seconds",
    "Time a create's sent-mark waited for replicas to acknowledge it (WAIT, under Sentinel), "
    "by outcome: acked, or lagging (fewer acks than wanted: the create is retried)",
    ["outcome"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)


def record_replica_wait(seconds: float, *, acked: bool) -> None:
    """A create's WAIT for replicas took ``seconds``; ``acked``: enough replicas answered."""
    REPLICA_WAIT_SECONDS.labels("acked" if acked else "lagging").observe(seconds)


def record_far_slot(account: str) -> None:
    """A caller's slot was too far off; it was told to reschedule."""
    _child(LIMITER_FAR, account).inc()


LIMITER_LATE = Counter(
    "paypoll_limiter_late_slots_total",
    "Slots left unused because the caller woke up too late for them (a CPU-starved host)",
    ["account"],
)


def record_late_slot(account: str) -> None:
    """A caller woke too late for its slot and took a fresh one."""
    LIMITER_LATE.labels(account).inc()


LIMITER_LATE_SENDS = Counter(
    "paypoll_limiter_late_sends_total",
    "Calls that reached the wire later than their slot's slack (the thread lost the CPU between "
    "its last check and the write); the key was fenced so no window holds one call too many",
    ["account"],
)


def record_late_send(account: str) -> None:
    """A call of ``account`` was written too late after its slot check; its key was fenced."""
    _child(LIMITER_LATE_SENDS, account).inc()


def record_penalty(account: str) -> None:
    """A 429 penalty was applied to ``account``'s key."""
    LIMITER_PENALTIES.labels(account).inc()


def record_token_failure(account: str, reason: str) -> None:
    """Obtaining a token for ``account`` failed; ``reason`` is a status code or error class name.

    Never pass the error's text: it could carry the credentials.
    """
    TOKEN_FAILURES.labels(account, reason).inc()


def record_transition(account: str, state: str) -> None:
    """A payment of ``account`` entered ``state`` (any state, terminal or not)."""
    _child(TRANSITIONS, account, state).inc()


def record_terminal(account: str, state: str, seconds_since_submit: float, polls: int) -> None:
    """A payment reached terminal ``state`` ``seconds_since_submit`` after submit, after ``polls``.

    Call it once per payment, alongside :func:`record_transition` for the same state.
    """
    TERMINAL_SECONDS.labels(account, state).observe(max(0.0, seconds_since_submit))
    POLLS_AT_TERMINAL.labels(account, state).observe(max(0, polls))


def record_detection_bound(account: str, seconds: float) -> None:
    """A poll saw a payment of ``account`` final ``seconds`` after the last one saw it pending."""
    _child(DETECTION_BOUND_SECONDS, account).observe(max(0.0, seconds))


def record_unknown_status(account: str) -> None:
    """The API answered a status paypoll does not know for one of ``account``'s payments."""
    UNKNOWN_STATUSES.labels(account).inc()


def record_job(actor: str, outcome: str, seconds: float) -> None:
    """A job of ``actor`` finished with ``outcome``: ``error`` when it raised, else what it did
    (``ok``, or a step's few-valued result such as ``polled``, ``retry``, ``far_slot``)."""
    _child(JOBS, actor, outcome).inc()
    _child(JOB_SECONDS, actor, outcome).observe(seconds)


# The API client's endpoints, and the status of a success on each (api-contract.md).
EVENTS_TRIMMED_UNREAD = Counter(
    "paypoll_events_trimmed_unread_total",
    "Events the stream's cap trimmed before a consumer group read and acknowledged them",
    ["group"],
)
CALLBACKS_SENT = Counter(
    "paypoll_callbacks_sent_total",
    "Final transitions sent to the user's callback actor (PAYPOLL_CALLBACK_ACTOR), by state",
    ["state"],
)


def prime_outbox(groups: Iterable[str], final_states: Iterable[str] = ()) -> None:
    """Create the series of the events consumers this process runs, at 0 (see prime_accounts)."""
    for group in groups:
        EVENTS_TRIMMED_UNREAD.labels(group)
    for state in final_states:
        CALLBACKS_SENT.labels(state)


# Transition to the endpoint's 2xx: milliseconds when it answers, up to days after an outage.
WEBHOOK_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400)
WEBHOOK_DELIVERIES = Counter(
    "paypoll_webhook_deliveries_total",
    "Webhook attempts by endpoint and outcome (2xx, 410, 4xx, 5xx, timeout, refused, ...)",
    ["endpoint", "outcome"],
)
WEBHOOK_LAG_SECONDS = Histogram(
    "paypoll_webhook_delivery_lag_seconds",
    "Time from a payment's transition to its webhook's 2xx, by endpoint",
    ["endpoint"],
    buckets=WEBHOOK_LAG_BUCKETS,
)
WEBHOOK_DEAD_LETTERED = Counter(
    "paypoll_webhook_dead_lettered_total",
    "Webhooks given up after PAYPOLL_WEBHOOK_RETRY_FOR (replayable: paypoll webhooks replay)",
    ["endpoint"],
)
WEBHOOK_OUTCOMES = ("2xx", "410", "4xx", "5xx", "timeout", "refused", "connection")


def prime_webhooks(endpoints: Iterable[str]) -> None:
    """Create the webhook series of the configured endpoints at 0 (see prime_accounts)."""
    for endpoint in endpoints:
        WEBHOOK_LAG_SECONDS.labels(endpoint)
        WEBHOOK_DEAD_LETTERED.labels(endpoint)
        for outcome in WEBHOOK_OUTCOMES:
            WEBHOOK_DELIVERIES.labels(endpoint, outcome)


ENDPOINTS = ("token", "create", "get")
SUCCESS_STATUS = "200"
# Token failure reasons primed at 0: 403 (credentials refused, its own alert), the statuses and
# transport errors a token call most often meets. Other reasons appear with their first failure.
PRIMED_TOKEN_REASONS = ("403", "401", "429", "500", "503", "NotSent", "Ambiguous")


def prime_accounts(
    accounts: Iterable[str],
    states: Iterable[str] = (),
    *,
    terminal_state: str | None = None,
    actors: Iterable[str] = (),
) -> None:
    """Create every series the dashboard and the alert rules query at 0, from a process's start.

    Prometheus cannot see the first increment of a series that appears with value 1 (there is no
    earlier sample), so alerts such as "a tracking timeout happened" would miss it, and a panel of
    a series not yet exposed says "No data" (issue 15: ``paypoll_token_failures_total``). Each
    worker process calls this at start with the configured accounts, every payment state, one
    state a payment ends in (for the per-account histograms) and the actors' names;
    tests/test_series_from_start.py checks that a fresh fleet exposes a series for every
    selector of the dashboard and alerts.yml.
    """
    states = tuple(states)
    for account in accounts:
        for counter in (RATE_LIMITED, LIMITER_GRANTED, LIMITER_FAR, LIMITER_PENALTIES):
            counter.labels(account)
        for per_account in (
            LIMITER_LATE,
            LIMITER_LATE_SENDS,
            UNKNOWN_STATUSES,
            LIMITER_WAIT_SECONDS,
            DETECTION_BOUND_SECONDS,
        ):
            per_account.labels(account)
        for endpoint in ENDPOINTS:
            API_CALLS.labels(account, endpoint, SUCCESS_STATUS)
        # The latency histogram for the poll endpoint only (17 series per endpoint and account):
        # its panels are quantiles by endpoint, which a first observation missed by rate()
        # does not change; the token and create series appear with their first call.
        API_CALL_SECONDS.labels(account, "get", SUCCESS_STATUS)
        for reason in PRIMED_TOKEN_REASONS:
            TOKEN_FAILURES.labels(account, reason)
        for state in states:
            TRANSITIONS.labels(account, state)
        if terminal_state is not None:
            # One state only: the time-to-terminal and polls histograms are 18 series each per
            # (account, state), and priming all seven final states made them two thirds of a
            # scrape (benchmarks/metrics_scrape.py: 1,000 keys, 398 -> 182 samples per key).
            # No alert reads them and their panels sum over states, so one series per account
            # is enough to show data; the other states' series appear when they happen.
            TERMINAL_SECONDS.labels(account, terminal_state)
            POLLS_AT_TERMINAL.labels(account, terminal_state)
    for actor in actors:
        JOBS_IN_PROGRESS.labels(actor)
        for outcome in (OUTCOME_OK, OUTCOME_ERROR):
            JOBS.labels(actor, outcome)
            JOB_SECONDS.labels(actor, outcome)


def job_started(actor: str) -> None:
    """A job of ``actor`` started: it counts in ``paypoll_jobs_in_progress`` until job_ended."""
    _child(JOBS_IN_PROGRESS, actor).inc()


def job_ended(actor: str, outcome: str, seconds: float) -> None:
    """A job counted by :func:`job_started` ended: stop counting it, and record_job it."""
    _child(JOBS_IN_PROGRESS, actor).dec()
    record_job(actor, outcome, seconds)


@contextmanager
def job_in_progress(actor: str) -> Iterator[None]:
    """Count a job of ``actor`` as running while the block runs, then record it with record_job.

    The outcome is ``ok`` when the block returns and ``error`` when it raises (the exception
    propagates), as worker/actors.py's JobContext names them. A process killed inside the block
    leaves its count behind until the fleet calls ``mark_process_dead`` for it.
    """
    job_started(actor)
    started = time.perf_counter()
    outcome = OUTCOME_OK
    try:
        yield
    except BaseException:
        outcome = OUTCOME_ERROR
        raise
    finally:
        job_ended(actor, outcome, time.perf_counter() - started)


# A sweeper pass of one shard: one pipelined claim per account, plus its plan every second.
PASS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# liveall: one series per live process and shard (the exporter adds the process's pid), 1 on
# the process that leads the shard: `paypoll_sweeper_shard_leader == 1` names the leader.
SWEEPER_SHARD_LEADER = Gauge(
    "paypoll_sweeper_shard_leader",
    "1 while this worker process leads the sweeper shard (its lease is held), else 0",
    ["shard"],
    multiprocess_mode="liveall",
)
SWEEPER_PASS_SECONDS = Histogram(
    "paypoll_sweeper_pass_seconds",
    "Duration of one sweeper pass over the accounts of a shard",
    ["shard"],
    buckets=PASS_BUCKETS,
)
SWEEPER_PASS_ACCOUNTS = Counter(
    "paypoll_sweeper_pass_accounts_total",
    "Accounts visited by sweeper passes of a shard (over passes: accounts per pass)",
    ["shard"],
)


LOCAL_STEPS = Counter(
    "paypoll_local_steps_total",
    "Tracks a sweeper pass claimed, by where they went: local (run by the claiming process, "
    "worker/local_steps.py) or spilled (sent on the broker: no room, or the process is behind)",
    ["route"],
)


LOCAL_STEPS_WAITING = Gauge(
    "paypoll_local_steps_waiting",
    "Steps inside worker processes' local steps (worker/local_steps.py), by stage: to_start "
    "(claimed, not started), at_timer (started, waiting for their slot), due (at their slot, "
    "waiting for a thread), to_write (answered, outcome not written yet); summed over live "
    "processes",
    ["stage"],
    multiprocess_mode="livesum",
)
LOCAL_STEPS_STAGES = ("to_start", "at_timer", "due", "to_write")


def record_local_waiting(waiting: Mapping[str, int]) -> None:
    """This process's local steps hold ``waiting[stage]`` steps at each stage now."""
    for stage in LOCAL_STEPS_STAGES:
        LOCAL_STEPS_WAITING.labels(stage).set(waiting.get(stage, 0))


def record_local_steps(*, local: int, spilled: int) -> None:
    """A pass ran ``local`` of its claimed tracks in its process and spilled ``spilled``."""
    if local:
        LOCAL_STEPS.labels("local").inc(local)
    if spilled:
        LOCAL_STEPS.labels("spilled").inc(spilled)


def prime_sweeper(shards: int) -> None:
    """Every shard's series at 0 from a process's start (see :func:`prime_accounts`)."""
    for shard in range(shards):
        SWEEPER_SHARD_LEADER.labels(str(shard)).set(0)
        SWEEPER_PASS_SECONDS.labels(str(shard))
        SWEEPER_PASS_ACCOUNTS.labels(str(shard))
    for route in ("local", "spilled"):
        LOCAL_STEPS.labels(route)
    for stage in LOCAL_STEPS_STAGES:
        LOCAL_STEPS_WAITING.labels(stage).set(0)


def record_shard_leader(shard: int, *, leading: bool) -> None:
    """This process took (``leading``) or lost the lease of sweeper shard ``shard``."""
    SWEEPER_SHARD_LEADER.labels(str(shard)).set(1 if leading else 0)


def record_sweeper_pass(shard: int, *, accounts: int, seconds: float) -> None:
    """One pass of shard ``shard`` visited ``accounts`` accounts in ``seconds``."""
    SWEEPER_PASS_SECONDS.labels(str(shard)).observe(seconds)
    SWEEPER_PASS_ACCOUNTS.labels(str(shard)).inc(accounts)
