"""The demo run: start everything, submit a batch, watch it to the end, summarise, stop.

Everything started is registered on one ExitStack the moment it exists, and the stack is
unwound with SIGINT/SIGTERM ignored, so Ctrl-C, SIGTERM, an error or the normal end all stop the
fleet, then the sandbox, then clean the demo's Redis keys (or stop the private Redis), in that
order. SIGTERM and SIGHUP are turned into the same interruption as Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from worker.connection import connect_redis
from worker.demo import probes
from worker.demo.redis_provider import DemoRedis, choose_redis
from worker.demo.stack import (
    DemoPlan,
    fleet_env,
    start_fleet,
    start_sandbox,
    write_accounts_file,
)
from worker.demo.view import AccountLine, PlainView, Progress, summary_lines
from worker.producer import Producer
from worker.store import PaymentStore
from worker.store.states import FINAL

SUMMARY_MARK = "DEMO-SUMMARY "  # prefix of the final machine-readable line (one JSON object)
REDIRECT_URL = "https://shop.example/thanks"


@dataclass(frozen=True)
class DemoOptions:
    """What the user asked for (see ``paypoll demo --help``)."""

    payments: int = 60
    accounts: int = 3
    rate: float = 5.0
    processes: int = 2
    threads: int = 8
    timeout: float = 180.0  # seconds to wait for every payment to be final
    interval: float = 1.0  # seconds between two progress updates
    redis_url: str | None = None  # PAYPOLL_REDIS_URL, if set
    probe_local_redis: bool = True
    keep_running: bool = False
    json_summary: Path | None = None
    seed: int | None = None


class Interrupted(Exception):
    """The user (Ctrl-C) or the system (SIGTERM, SIGHUP) asked the demo to stop."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_received: list[str] = []  # signals taken inside _interruptible(), by name


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into :class:`Interrupted` inside the block.

    The handler raises where the main thread happens to be, and Python ignores an exception
    raised inside a finalizer or ``__del__`` (a CI run: a SIGTERM that landed while urllib3
    closed a pool's sockets was printed as "Exception ignored" and the demo ran on to the
    end). So the signal is also recorded, and :func:`_raise_if_interrupted` raises it again
    at the loops' next turn."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        _received.append(signal.Signals(signum).name)
        raise Interrupted(_received[-1])

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    _received.clear()
    previous = {sig: signal.signal(sig, interrupt) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal was taken whose exception got lost."""
    if _received:
        raise Interrupted(_received[0])


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM/SIGHUP inside the block (clean-up must run to its end)."""
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _by_route(clients: Iterable[Mapping[str, Any]], status: str) -> dict[str, int]:
    """Answers with ``status`` per route, summed over the sandbox's ``clients`` entries."""
    counts: dict[str, int] = {}
    for client in clients:
        for route, statuses in client.get("requests", {}).items():
            if statuses.get(status):
                counts[route] = counts.get(route, 0) + int(statuses[status])
    return counts


class Demo:
    """One run of the demo; :meth:`run` returns the exit status."""

    def __init__(self, options: DemoOptions, view: PlainView) -> None:
        self.options = options
        self.view = view
        self.plan = DemoPlan.make(
            accounts=options.accounts,
            rate=options.rate,
            processes=options.processes,
            threads=options.threads,
            seed=options.seed,
        )
        self.started = time.monotonic()
        self.redis: DemoRedis | None = None
        self.sandbox_url = ""
        self.metrics_url = ""
        self.producer: Producer | None = None

    def run(self) -> int:
        """Start, submit, watch, summarise, stop; 0 when every payment is final, 1 on error or
        timeout, 130 when interrupted."""
        stack = contextlib.ExitStack()
        status = 1
        try:
            with _interruptible():
                try:
                    status = self._run(stack)
                except Interrupted as exc:
                    self.view.message(f"interrupted ({exc}): stopping everything the demo started")
                    self._try_summary(interrupted=True)
                    status = 130
                except (RuntimeError, OSError) as exc:
                    self.view.message(f"paypoll demo: {exc}")
                    status = 1
        finally:
            with _uninterruptible():
                self.view.close()
                stack.close()
                self.view.message("stopped everything the demo started")
        return status

    def _run(self, stack: contextlib.ExitStack) -> int:
        options, plan, view = self.options, self.plan, self.view
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="paypoll-demo-")))
        self.redis = choose_redis(
            options.redis_url,
            probe_local=options.probe_local_redis,
            workdir=workdir,
            stack=stack,
        )
        redis_info = self.redis
        stack.callback(lambda: redis_info.cleanup(plan.prefix))
        view.message(f"redis: {self.redis.describe()} (keys under {plan.prefix}:)")

        sandbox, self.sandbox_url = start_sandbox(plan, workdir, stack)
        view.message(
            f"sandbox: {self.sandbox_url} ({len(plan.accounts)} API keys, "
            f"{plan.rate:g} req/s each, pid {sandbox.pid})"
        )

        accounts_file = write_accounts_file(workdir / "accounts.toml", plan.accounts)
        port = _free_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        env = fleet_env(
            plan,
            redis_url=self.redis.url,
            api_url=self.sandbox_url,
            accounts_file=accounts_file,
            metrics_port=port,
        )
        view.message(
            f"workers: paypoll worker --processes {plan.processes} --threads {plan.threads} "
            "(starting)"
        )
        fleet = start_fleet(plan, env, workdir, self.metrics_url, stack)
        view.message(f"workers: running (pid {fleet.pid}); metrics at {self.metrics_url}")

        settings = plan.settings(redis_url=self.redis.url, api_url=self.sandbox_url)
        client = connect_redis(settings.redis_url)
        stack.callback(client.close)
        store = PaymentStore(
            redis=client, keys=settings.keys(), events_maxlen=settings.events_maxlen
        )
        self.producer = Producer(settings=settings, store=store)
        self._submit()
        view.message(f"submitted {options.payments} payments; tracking them to the end")

        deadline = time.monotonic() + options.timeout
        while True:
            _raise_if_interrupted()
            snap = self._progress()
            view.progress(snap)
            if snap.finished >= options.payments:
                _raise_if_interrupted()
                break
            if not fleet.alive():
                raise RuntimeError(f"the worker fleet exited:\n{fleet.log_tail()}")
            if time.monotonic() > deadline:
                view.message(f"timed out after {options.timeout:g}s with payments still active")
                self._try_summary(interrupted=False)
                return 1
            time.sleep(options.interval)
        self._try_summary(interrupted=False)
        if options.keep_running:
            view.message(
                f"still running: metrics {self.metrics_url}, sandbox {self.sandbox_url}/_admin/"
                "stats; Ctrl-C stops everything"
            )
            while fleet.alive():
                _raise_if_interrupted()
                time.sleep(0.5)
            raise RuntimeError("the worker fleet exited")
        _raise_if_interrupted()
        return 0

    def _submit(self) -> None:
        assert self.producer is not None
        names = [a.name for a in self.plan.accounts]
        for i in range(self.options.payments):
            self.producer.submit_payment(
                account=names[i % len(names)],
                amount=str(10 + (i * 7) % 90),
                redirect_url=REDIRECT_URL,
                reference_id=f"demo-{i:05d}",
            )

    def _account_lines(self, stats: Mapping[str, Any]) -> list[AccountLine]:
        lines = []
        for account in self.plan.accounts:
            seen = stats["clients"].get(account.client_id, {})
            lines.append(
                AccountLine(
                    name=account.name,
                    # Counted on the sandbox's clock over its last second: the rate the API saw.
                    rps=probes.accepted_in_last_second(
                        seen.get("accepted_times", []), float(stats["now"])
                    ),
                    limit=account.rate,
                    peak_1s=int(seen.get("max_accepted_in_1s", 0)),
                    rate_limited=int(seen.get("rate_limited", 0)),
                )
            )
        return lines

    def _progress(self) -> Progress:
        assert self.producer is not None
        stats = probes.sandbox_stats(self.sandbox_url, times=True)
        return Progress(
            elapsed=time.monotonic() - self.started,
            total=self.options.payments,
            counts=dict(self.producer.counts()),
            accounts=self._account_lines(stats),
        )

    def _try_summary(self, *, interrupted: bool) -> None:
        """Print the summary (and the machine-readable line); on an interrupted or broken run,
        whatever can still be read."""
        try:
            summary = self.summary(interrupted=interrupted)
        except Exception as exc:  # the parts may be half-started: say so, do not crash clean-up
            self.view.message(f"no summary: {type(exc).__name__}: {exc}")
            return
        for line in summary_lines(summary):
            self.view.message(line)
        self.view.message(SUMMARY_MARK + json.dumps(summary, sort_keys=True))
        if self.options.json_summary is not None:
            self.options.json_summary.write_text(json.dumps(summary, indent=2, sort_keys=True))

    def summary(self, *, interrupted: bool) -> dict[str, Any]:
        """What happened, from the store (states), the sandbox (what reached the API) and the
        fleet's /metrics (latency)."""
        if self.producer is None or not self.sandbox_url:
            raise RuntimeError("the demo did not get as far as submitting")
        ids = {a.client_id: a.name for a in self.plan.accounts}
        stats = probes.sandbox_stats(self.sandbox_url, payments=True)
        clients = {cid: stats["clients"].get(cid, {}) for cid in ids}
        creates = sum(
            sum(refs.values()) for cid, refs in stats["creates_by_reference"].items() if cid in ids
        )
        payments = [p for p in stats.get("payments", {}).values() if p["client_id"] in ids]
        statuses: dict[str, int] = {}
        for payment in payments:
            statuses[payment["status"]] = statuses.get(payment["status"], 0) + 1
        polls = [int(p["polls"]) for p in payments]
        try:
            text = probes.metrics_text(self.metrics_url)
        except Exception:
            text = ""
        buckets = probes.histogram_buckets(text, "paypoll_api_call_seconds")
        counts = dict(self.producer.counts())
        return {
            "payments": self.options.payments,
            "accounts": [a.name for a in self.plan.accounts],
            "rate": self.plan.rate,
            "states": counts,
            "finished": sum(n for s, n in counts.items() if s in FINAL),
            "sandbox": {
                "url": self.sandbox_url,
                "creates": creates,
                "payments_count": len(payments),
                "statuses": statuses,
                "duplicates": [d for d in stats["duplicates"] if d["client_id"] in ids],
                "dropped_creates": len(stats["dropped_creates"]),
                "rate_limited": sum(int(c.get("rate_limited", 0)) for c in clients.values()),
                "rate_limited_by_route": _by_route(clients.values(), "429"),
                "requests": sum(int(c.get("total", 0)) for c in clients.values()),
                "token_calls": sum(int(c.get("token_calls", 0)) for c in clients.values()),
                "max_accepted_in_1s": {
                    ids[cid]: int(c.get("max_accepted_in_1s", 0)) for cid, c in clients.items()
                },
            },
            "polls_per_payment": {
                "mean": sum(polls) / len(polls) if polls else 0.0,
                "max": max(polls, default=0),
            },
            "latency_seconds": {
                "p50": probes.quantile(0.5, buckets),
                "p99": probes.quantile(0.99, buckets),
                "calls": buckets[-1][1] if buckets else 0,
            },
            "worker_rate_limited": probes.counter_total(text, "paypoll_api_rate_limited_total"),
            "duration_seconds": time.monotonic() - self.started,
            "redis": self.redis.describe() if self.redis else "",
            "key_prefix": self.plan.prefix,
            "metrics_url": self.metrics_url,
            "keep_running": self.options.keep_running,
            "interrupted": interrupted,
            "pid": os.getpid(),
        }
