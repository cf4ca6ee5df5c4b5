"""A real Prometheus scraping a real `paypoll worker` fleet (2 processes) working the sandbox.

The exposed counters are checked against what the sandbox saw, and the dashboard's panels that a
fault-free run feeds return data through Prometheus. (tests/test_prometheus.py covers every
panel, the fault-fed ones included, with a synthetic workload.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet_harness import paypoll_env, running_fleet, wait_started, write_accounts
from tests.prometheus_server import running_prometheus, samples, scrape
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from tests.test_prometheus import ALERTS, dashboard_queries
from tests.waiting import wait_until
from tests.webhook_receiver import WebhookReceiver, new_secret
from worker.producer import Producer
from worker.settings import load_settings
from worker.store import FINAL

CLIENTS = {"acme": "s3cret-acme", "globex": "s3cret-globex"}
RATE = 10
PAYMENTS = 30
# Panels only faults feed (429s, token failures, unknown statuses, raised jobs, create_unknown):
# a clean run leaves them empty, as it should.
FAULT_ONLY = ("429s and penalties", "Token failures", "Unknown API statuses", "Job errors")
FAULT_ONLY += ("Needs attention", "Jobs in progress")
# Only under contention (a slot further than max_wait); shows 0 once the fleet's processes call
# metrics.prime_accounts at start. Jobs in progress: once actors call job_started/job_ended.
FAULT_ONLY += ("Slots granted and far-slot reschedules / B",)


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox(
        client=[f"{cid}:{secret}" for cid, secret in CLIENTS.items()],
        rate=RATE,
        pay_after="0.5:2",
        outcomes="paid=0.6,expired=0.2,cancelled=0.2",
        seed=5,
    ) as sb:
        yield sb


def _sum(found: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbls), v in found.items() if n == name and want <= lbls)


@pytest.mark.prometheus
def test_prometheus_scrapes_a_real_fleet(
    tmp_path: Path,
    redis_url: str,
    sandbox: RunningSandbox,
    key_prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    receiver = WebhookReceiver(secret=new_secret())  # webhooks delivered: lag and outcomes
    receiver.up()
    env = paypoll_env(
        redis_url=redis_url,
        api_url=sandbox.url,
        accounts_file=write_accounts(tmp_path, CLIENTS, RATE),
        key_prefix=key_prefix,
        poll_first_delay=0.5,
        poll_max_delay=1.0,
        # Final states go to an actor no one runs: the outbox's group and counters are live.
        callback_actor="shop-events:payment_done",
        webhook_url=receiver.url,
        webhook_secret=receiver.secret,
    )
    target = f"127.0.0.1:{env['PAYPOLL_METRICS_PORT']}"
    request.addfinalizer(receiver.down)
    producer = Producer.from_settings(load_settings(env))
    with (
        running_fleet(env, processes=2, threads=4) as fleet,
        running_prometheus(targets=[target], rule_files=[ALERTS]) as prom,
    ):
        wait_started(fleet, 2)
        wait_until(prom.targets_up, timeout=20, what="Prometheus to scrape the fleet")
        # Submitted only now, so Prometheus sees the counters rise (rates, quantiles).
        for i in range(PAYMENTS):
            producer.submit_payment(
                account=sorted(CLIENTS)[i % 2],
                amount="10",
                redirect_url="https://shop.test/thanks",
                reference_id=f"order-{i}",
            )

        def all_final() -> bool:
            counts = producer.counts()
            return sum(counts[s.value] for s in FINAL) == PAYMENTS

        wait_until(all_final, timeout=60, interval=0.25, what=f"{PAYMENTS} payments final")

        # Counters of both processes, summed, equal what the sandbox saw.
        stats = sandbox.stats()

        def exported() -> dict[Any, float] | None:
            found = samples(scrape(f"http://{target}/metrics"))
            calls = {cid: _sum(found, "paypoll_api_calls_total", account=cid) for cid in CLIENTS}
            totals = {cid: stats["clients"][cid]["total"] for cid in CLIENTS}
            return found if calls == totals else None

        found = wait_until(exported, timeout=10, what="API call counters = sandbox totals")
        creates = _sum(found, "paypoll_api_calls_total", endpoint="create")
        refused = _sum(found, "paypoll_api_calls_total", endpoint="create", outcome="429")
        assert creates - refused == PAYMENTS  # one accepted create per payment
        finals = sum(
            _sum(found, "paypoll_payment_terminal_seconds_count", state=state)
            for state in ("paid", "expired", "cancelled")
        )
        assert finals == PAYMENTS
        for cid in CLIENTS:  # 429s counted as the sandbox refused them (whether 0 or not)
            refused = stats["clients"][cid]["rate_limited"]
            assert _sum(found, "paypoll_api_rate_limited_total", account=cid) == refused
        assert _sum(found, "paypoll_workers_alive") == 2

        # The dashboard's panels fed by a clean run return numbers through Prometheus.
        queries = [(n, e) for n, e in dashboard_queries() if not n.startswith(FAULT_ONLY)]
        missing: list[str] = []

        def panels_have_data() -> bool:
            missing[:] = [
                name
                for name, expr in queries
                if not any(r["value"][1] != "NaN" for r in prom.query(expr))
            ]
            return not missing

        try:
            wait_until(panels_have_data, timeout=20, interval=0.5, what="dashboard data")
        except AssertionError:
            pytest.fail(f"dashboard targets without data from a real fleet: {missing}")
