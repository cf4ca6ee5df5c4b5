"""``paypoll demo`` as a user runs it: a real subprocess with real Redis, sandbox and workers.

Each run's summary (its last line, ``DEMO-SUMMARY {json}``) is checked for consistency between
what paypoll recorded and what the sandbox saw; every process the demo started is collected
from /proc while it runs and must be gone when it exits, also after a SIGINT mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.redis_server import free_port
from tests.waiting import wait_until
from worker.demo.orchestrator import SUMMARY_MARK

ROOT = Path(__file__).resolve().parent.parent
PAID_LIKE = ("paid", "expired", "cancelled")


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, start time in clock ticks, state) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as stat:
                text = stat.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = text[text.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def _descendants(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``root``."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, table[child][1]))
            todo.append(child)
    return found


def _still_running(seen: set[tuple[int, int]]) -> list[int]:
    """Pids of ``seen`` that still run (same pid and start time, not a zombie)."""
    table = _proc_table()
    return [
        pid
        for pid, start in seen
        if pid in table and table[pid][1] == start and table[pid][2] != "Z"
    ]


class DemoRun:
    """A ``paypoll demo`` subprocess whose output and descendants are collected as it runs."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "demo", "--plain", *args],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            text=True,
        )
        self.seen: set[tuple[int, int]] = set()
        self._watching = True
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while self._watching and self.process.poll() is None:
            self.seen |= _descendants(self.process.pid)
            time.sleep(0.05)

    def output(self) -> str:
        self.out.flush()
        self.out.seek(0)
        return self.out.read()

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._watching = False
        self._watcher.join(5)
        return code

    def summary(self) -> dict[str, Any]:
        lines = [line for line in self.output().splitlines() if line.startswith(SUMMARY_MARK)]
        assert lines, f"no summary line in:\n{self.output()}"
        data: dict[str, Any] = json.loads(lines[-1][len(SUMMARY_MARK) :])
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.out.close()


@pytest.fixture
def demo_env(redis_url: str) -> dict[str, str]:
    """The environment of a demo run on the tests' Redis, with no user settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYPOLL_")}
    env["PAYPOLL_REDIS_URL"] = redis_url
    return env


@pytest.fixture
def run_demo() -> Iterator[Any]:
    runs: list[DemoRun] = []

    def start(*args: str, env: dict[str, str]) -> DemoRun:
        run = DemoRun(*args, env=env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def _no_demo_keys(url: str, prefix: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return not list(client.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        client.close()


def _check_consistent(summary: dict[str, Any], payments: int) -> None:
    """What paypoll recorded agrees with what the sandbox saw, and the invariants held."""
    sandbox, states = summary["sandbox"], summary["states"]
    assert summary["payments"] == payments
    assert summary["finished"] == payments
    assert sum(states[s] for s in PAID_LIKE) == payments, states
    assert sandbox["creates"] == payments  # one create per payment
    assert sandbox["payments_count"] == payments
    assert sandbox["duplicates"] == []
    # The limiter keeps each key under its limit with the default margin: no 429 at all.
    assert sandbox["rate_limited"] == 0, sandbox
    assert summary["worker_rate_limited"] == sandbox["rate_limited"]
    # The store's terminal states are the API's own, payment for payment in aggregate.
    assert {s: states[s] for s in PAID_LIKE if states[s]} == sandbox["statuses"]
    # Accepted requests never exceed the limit in any 1-second window (the sandbox enforces it).
    assert all(peak <= summary["rate"] for peak in sandbox["max_accepted_in_1s"].values())
    assert summary["polls_per_payment"]["max"] >= 1
    # Every request the sandbox answered was timed by the workers (token calls included).
    assert summary["latency_seconds"]["calls"] == sandbox["requests"]
    assert 0 < summary["latency_seconds"]["p50"] <= summary["latency_seconds"]["p99"]


def test_demo_runs_a_batch_to_the_end_and_leaves_nothing_behind(
    run_demo: Any, demo_env: dict[str, str], redis_url: str
) -> None:
    run = run_demo("--payments", "20", env=demo_env)
    assert run.wait(90) == 0, run.output()
    out = run.output()
    summary = run.summary()
    _check_consistent(summary, 20)
    assert "using PAYPOLL_REDIS_URL" in out
    assert summary["sandbox"]["token_calls"] == 3  # one token per key, shared by the fleet
    assert summary["duration_seconds"] < 40
    # Progress lines showed each account's rate against its limit.
    assert "shop-a:" in out and "/5 req/s" in out
    # sandbox, fleet, its 2 worker processes: all seen, all gone.
    assert len(run.seen) >= 4, run.seen
    assert _still_running(run.seen) == []
    # Only the demo's own keys were written, and they were deleted.
    assert _no_demo_keys(redis_url, summary["key_prefix"])
    # No secret of the throwaway accounts leaks into the output.
    assert "client_secret" not in out


def test_sigint_mid_run_stops_every_process(
    run_demo: Any, demo_env: dict[str, str], redis_url: str
) -> None:
    run = run_demo("--payments", "300", env=demo_env)
    wait_until(lambda: "submitted 300 payments" in run.output(), timeout=60, what="submit")
    wait_until(lambda: len(run.seen) >= 4, timeout=10, what="the fleet's processes")
    wait_until(lambda: "done |" in run.output(), timeout=10, what="a progress line")
    run.process.send_signal(signal.SIGINT)
    assert run.wait(60) == 130, run.output()
    out = run.output()
    assert "interrupted (SIGINT)" in out
    assert _still_running(run.seen) == []
    summary = run.summary()
    assert summary["interrupted"] is True
    assert summary["finished"] < 300
    assert _no_demo_keys(redis_url, summary["key_prefix"])


def test_sigterm_mid_run_stops_every_process(run_demo: Any, demo_env: dict[str, str]) -> None:
    run = run_demo("--payments", "300", env=demo_env)
    wait_until(lambda: "submitted 300 payments" in run.output(), timeout=60, what="submit")
    wait_until(lambda: len(run.seen) >= 4, timeout=10, what="the fleet's processes")
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(60) == 130, run.output()
    assert "interrupted (SIGTERM)" in run.output()
    assert _still_running(run.seen) == []


def test_demo_starts_a_private_redis_when_none_answers(
    run_demo: Any, demo_env: dict[str, str]
) -> None:
    env = dict(demo_env, PAYPOLL_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    run = run_demo("--payments", "6", "--accounts", "2", "--no-local-redis", env=env)
    assert run.wait(90) == 0, run.output()
    out = run.output()
    assert "started a private Redis" in out
    assert "does not answer" in out
    _check_consistent(run.summary(), 6)
    assert _still_running(run.seen) == []
