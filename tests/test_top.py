"""`paypoll top` (issue 15) pointed at a real running fleet: --once --json for scripts, plain
lines off a TTY, and a fleet whose /metrics cannot be reached."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet_harness import paypoll_env, running_fleet, wait_started, write_accounts
from tests.redis_server import free_port
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from tests.waiting import wait_until
from worker.commands.top import report_lines
from worker.producer import Producer
from worker.settings import load_settings
from worker.top import histogram_quantile

CLIENTS = {"acme": "s3cret-acme-Tp40", "globex": "s3cret-globex-Wq61"}
RATE = 5
PAYMENTS = 40


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    # Payers take 20-60 s: payments stay pending and are polled for the whole test.
    with running_sandbox(
        client=[f"{cid}:{secret}" for cid, secret in CLIENTS.items()], rate=RATE, pay_after="20:60"
    ) as sb:
        yield sb


def top(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "top", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    for secret in CLIENTS.values():
        assert secret not in done.stdout + done.stderr
    return done


def _sent(sandbox: RunningSandbox) -> dict[str, int]:
    return {cid: int(c["total"]) for cid, c in sandbox.stats(payments=False)["clients"].items()}


def test_top_once_json_reports_a_running_fleet(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str
) -> None:
    env = paypoll_env(
        redis_url=redis_url,
        api_url=sandbox.url,
        accounts_file=write_accounts(tmp_path, CLIENTS, RATE),
        key_prefix=key_prefix,
    )
    producer = Producer.from_settings(load_settings(env))
    with running_fleet(env, processes=1, threads=8) as fleet:
        wait_started(fleet, 1)
        for i in range(PAYMENTS):
            producer.submit_payment(
                account=sorted(CLIENTS)[i % 2],
                amount="10",
                redirect_url="https://shop.test/ok",
                reference_id=f"top-{i}",
            )
        wait_until(lambda: sum(_sent(sandbox).values()) >= 10, timeout=20, what="API traffic")
        before = _sent(sandbox)
        done = top(env, "--once", "--json", "--interval", "2")
        after = _sent(sandbox)
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)

        assert report["workers_alive"] == 1
        assert sum(report["payments"].values()) == PAYMENTS
        assert report["metrics"]["failed"] == {} and len(report["metrics"]["reached"]) == 1
        assert set(report["queues"]) == {"paypoll-create", "paypoll-track"}
        assert 1.9 <= report["sample_seconds"] <= 10
        for name in CLIENTS:
            acct = report["accounts"][name]
            assert acct["limit"] == RATE
            assert sum(acct["payments"].values()) == PAYMENTS // 2
            assert acct["rate_limited_total"] == 0  # the sandbox answered no 429
            # The calls top counted in its window happened while it ran (one call of slack
            # for a call answered just before the first scrape), and the key was busy.
            counted = acct["requests_per_second"] * report["sample_seconds"]
            assert 0 < counted <= after[name] - before[name] + 1
            assert acct["requests_per_second"] <= RATE * 1.25
            assert acct["detection_delay_bound_seconds"] >= 0
        bound = max(a["detection_delay_bound_seconds"] for a in report["accounts"].values())
        assert report["detection_delay_bound_seconds"] == bound

        # Off a TTY: one plain line per refresh.
        plain = top(env, "--count", "2", "--interval", "0.5")
        assert plain.returncode == 0, plain.stderr
        lines = plain.stdout.splitlines()
        assert len(lines) == 2 and all("acme " in line and "req/s" in line for line in lines)
        assert "\x1b[" not in plain.stdout


def test_top_without_reachable_metrics_still_shows_the_store(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    env = paypoll_env(
        redis_url=redis_url,
        api_url="http://127.0.0.1:1",
        accounts_file=write_accounts(tmp_path, CLIENTS, RATE),
        key_prefix=key_prefix,
    )
    Producer.from_settings(load_settings(env)).submit_payment(
        account="acme", amount="1", redirect_url="https://shop.test/ok", reference_id="q-1"
    )
    url = f"http://127.0.0.1:{free_port()}/metrics"
    done = top(env, "--once", "--json", "--interval", "0.2", "--metrics", url)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert list(report["metrics"]["failed"]) == [url]
    assert report["accounts"]["acme"]["payments"]["queued"] == 1
    assert report["accounts"]["acme"]["requests_per_second"] is None
    assert report["workers_alive"] == 0
    text = "\n".join(report_lines(report, "redis://x"))
    assert "metrics unreachable: " + url in text and "acme" in text


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.5: 10.0, 1.0: 20.0, 2.5: 40.0, float("inf"): 40.0}
    assert histogram_quantile(0.5, buckets) == 1.0
    assert histogram_quantile(0.95, buckets) == pytest.approx(1.0 + 1.5 * (38 - 20) / 20)
    assert histogram_quantile(0.5, {float("inf"): 0.0}) is None
