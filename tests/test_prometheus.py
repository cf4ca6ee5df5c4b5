"""The exporter as Prometheus sees it: promtool's lint, and a real Prometheus server scraping it.

A spawned worker process records a steady workload (every record_* function, a heartbeat in
Redis), the store layout is written to the real Redis fixture, and this process serves both
through the real exporter. A real Prometheus scrapes it every second and evaluates alerts.yml;
every PromQL expression of the dashboard and of the alert rules is then run through its HTTP API.

When the fleet exists (worker/fleet.py), the ``live_exporter`` fixture becomes "start
`paypoll worker` against the sandbox" and yields its metrics address; the rest stays.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.prometheus_server import PrometheusServer, require_prometheus, running_prometheus
from tests.prometheus_server import scrape as scrape_text
from tests.test_metrics_collectors import QUEUES, fill_queues, populate_store, redis_now
from tests.waiting import wait_until
from worker.collectors import AccountLimitsCollector, StoreCollector
from worker.events import ensure_group
from worker.exporter import MULTIPROC_ENV, Exporter, prepare_multiprocess_dir, start_exporter
from worker.keys import Keys
from worker.polling.allocation import Plan
from worker.polling.model import CompletionModel
from worker.polling.store import PlanStore
from worker.settings import Account, Secret

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "alerts.yml"
DASHBOARD = ROOT / "grafana" / "dashboards" / "paypoll.json"
SPAWN = multiprocessing.get_context("spawn")
STATES = ("queued", "creating", "pending", "paid", "expired", "cancelled", "rejected")
STATES += ("create_unknown", "tracking_timeout", "failed")
# Grafana's variables, as Grafana would expand them for a 1 s scrape interval and "All" accounts.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$account": ".*"}


def _workload(redis_url: str, prefix: str, stop: Any, started: Any) -> None:
    """Child: a worker's steady traffic, with a heartbeat as the fleet's processes write it."""
    from worker import metrics

    client = redis.Redis.from_url(redis_url)
    member = f"{socket.gethostname()}:{os.getpid()}"
    metrics.prime_accounts(["acme", "globex"], STATES)
    metrics.prime_outbox(["paypoll-callbacks"], ["paid"])
    metrics.prime_webhooks(["global"])
    metrics.prime_sweeper(2)
    metrics.record_shard_leader(0, leading=True)
    i = 0
    while not stop.is_set():
        seconds, micros = client.time()
        client.zadd(Keys(prefix).heartbeat(), {member: seconds + micros / 1e6})
        with metrics.job_in_progress("track"):
            metrics.record_limiter_grant("acme", 0.01 * (i % 5))
            metrics.record_api_call("acme", "token", "200", 0.03)
            metrics.record_api_call("acme", "create", "201", 0.05)
            metrics.record_api_call("acme", "get", "200", 0.02 + 0.001 * (i % 10))
            metrics.record_transition("acme", "paid")
            metrics.record_terminal("acme", "paid", 30.0 + i % 60, 3 + i % 5)
            metrics.record_detection_bound("acme", 0.5 + i % 5)
            metrics.record_sweeper_pass(0, accounts=2, seconds=0.002 + 0.001 * (i % 3))
            metrics.CALLBACKS_SENT.labels("paid").inc()
            metrics.WEBHOOK_DELIVERIES.labels("global", "2xx").inc()
            metrics.WEBHOOK_LAG_SECONDS.labels("global").observe(0.02 + 0.01 * (i % 7))
            if i % 4 == 0:
                metrics.record_api_call("acme", "get", "429", 0.01)
                metrics.record_penalty("acme")
                metrics.record_far_slot("acme")
                metrics.record_unknown_status("acme")
                metrics.record_token_failure("acme", "ServerError")
        with contextlib.suppress(RuntimeError), metrics.job_in_progress("create"):
            raise RuntimeError("a failing job")
        if i == 0:
            started.set()
        i += 1
        stop.wait(0.05)


@dataclass
class LiveExporter:
    exporter: Exporter
    keys: Keys
    client: redis.Redis

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.exporter.port}"


@pytest.fixture
def live_exporter(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    redis_client: redis.Redis,
    keys: Keys,
    key_prefix: str,
) -> Iterator[LiveExporter]:
    directory = prepare_multiprocess_dir(tmp_path / "metrics")
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    namespace = f"{key_prefix}-dq"
    populate_store(redis_client, keys, redis_now(redis_client))
    # A plan as the sweeper writes it (the planner's gauges), and a shared slot taken.
    plans = PlanStore(redis=redis_client, keys=keys)
    plans.write_plans({"acme": (Plan.idle(), CompletionModel(), 4.5)})
    plans.take_shared_slot("acme")
    # A consumer group of the events stream, one event delivered and not acknowledged.
    ensure_group(redis_client, keys, "paypoll-callbacks", start="0")
    redis_client.xadd(keys.events(), {"account": "acme", "reference_id": "r", "to": "paid"})
    redis_client.xreadgroup("paypoll-callbacks", "c", {keys.events(): ">"}, count=1)
    # A webhook waiting for its endpoint, and one dead letter.
    webhook = {
        "msg_id": "msg_1",
        "type": "payment.paid",
        "body": "{}",
        "at": "1",
        "account": "acme",
    }
    redis_client.xadd(keys.webhook("global", "queue"), webhook)
    redis_client.xadd(keys.webhook("global", "dead"), webhook)
    # Only the workload process beats from now on (the populated beats would age out mid-test).
    redis_client.zrem(keys.heartbeat(), "host-a:11", "host-a:12")
    broker = fill_queues(redis_url, namespace)
    stop, started = SPAWN.Event(), SPAWN.Event()
    worker = SPAWN.Process(target=_workload, args=(redis_url, key_prefix, stop, started))
    worker.start()
    exporter = start_exporter(
        host="127.0.0.1",
        port=0,
        multiprocess_dir=directory,
        collectors=[
            StoreCollector.from_url(
                redis_url,
                keys=keys,
                namespace=namespace,
                queues=QUEUES,
                webhook_endpoints=["global"],
            ),
            AccountLimitsCollector.from_accounts(
                [Account("acme", "id-a", Secret("x"), 5.0), Account("globex", "id-g", Secret("y"))]
            ),
        ],
    )
    try:
        assert started.wait(30), "the workload process did not start"
        yield LiveExporter(exporter, keys, redis_client)
    finally:
        stop.set()
        worker.join(30)
        exporter.stop()
        broker.close()
    assert worker.exitcode == 0


def test_promtool_check_metrics_accepts_the_exposition(live_exporter: LiveExporter) -> None:
    promtool = require_prometheus("promtool")
    exposition = scrape_text(live_exporter.exporter.url)
    for family in ("paypoll_api_call_seconds", "paypoll_payments", "paypoll_workers_alive"):
        assert f"# TYPE {family} " in exposition
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "", checked.stdout  # no lint finding at all


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, expression with Grafana's variables expanded) of every target."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, expansion in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, expansion)
            assert "$" not in expr, f"unexpanded variable in {panel['title']}: {expr}"
            queries.append((f"{panel['title']} / {target['refId']}", expr))
    return queries


def _has_number(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(series["value"][1])) for series in result)


@pytest.mark.prometheus
def test_real_prometheus_scrapes_the_exporter_and_every_query_works(
    live_exporter: LiveExporter,
) -> None:
    with running_prometheus(targets=[live_exporter.target], rule_files=[ALERTS]) as prom:
        wait_until(prom.targets_up, timeout=15, what="Prometheus to scrape the exporter")

        # Values made it through, as they are in the store and the workload.
        def pending() -> list[dict[str, Any]]:
            return prom.query('paypoll_payments{account="acme", state="pending"}')

        assert wait_until(pending, timeout=10, what="store gauges")[0]["value"][1] == "3"
        alive = prom.query("max(paypoll_workers_alive)")
        assert alive[0]["value"][1] == "1"  # the workload's beat; the stale one is not counted
        assert float(prom.query("sum(paypoll_api_calls_total)")[0]["value"][1]) > 0

        # Every dashboard target returns data with at least one number (not only NaN).
        queries = dashboard_queries()
        assert len(queries) >= 20

        def empty_panels() -> list[str]:
            return [name for name, expr in queries if not _has_number(prom.query(expr))]

        missing: list[str] = []

        def all_panels_have_data() -> bool:
            missing[:] = empty_panels()
            return not missing

        try:
            wait_until(all_panels_have_data, timeout=20, interval=0.5, what="dashboard data")
        except AssertionError:
            pytest.fail(f"dashboard targets still without data after 20 s: {missing}")

        check_alert_rules(prom)


def check_alert_rules(prom: PrometheusServer) -> None:
    """Every rule of alerts.yml is loaded, evaluates without error, and its query parses."""
    declared = re.findall(r"^\s*- alert: (\w+)", ALERTS.read_text(), flags=re.MULTILINE)

    def rules() -> list[dict[str, Any]]:
        groups = prom.api("rules")["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        return loaded if loaded and all(r["health"] != "unknown" for r in loaded) else []

    loaded = wait_until(rules, timeout=10, what="alert rules to be evaluated")
    assert sorted(r["name"] for r in loaded) == sorted(declared)
    for rule in loaded:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        prom.query(rule["query"])  # raises on a parse or evaluation error

    # Rules see the real data: create_unknown payments and 429s make their alerts pending.
    def active() -> set[str]:
        return {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]}

    wait_until(
        lambda: {"PaypollPaymentsNeedAttention", "PaypollRateLimited"} <= active(),
        timeout=10,
        what="alerts on the live data",
    )
    assert "PaypollNoWorkerAlive" not in active()
    assert "PaypollRedisUnreachable" not in active()
