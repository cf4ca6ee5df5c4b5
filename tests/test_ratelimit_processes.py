"""The rate limiter across real processes: window bound, key independence, shared penalty, and
reservations abandoned by a killed process. The API-facing proof against the sandbox is in
tests/test_ratelimit_sandbox.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.queues import Queue
from typing import Any

import pytest
import redis
import requests

from worker.errors import SlotTooFar
from worker.keys import Keys
from worker.ratelimit import RateLimiter

SPAWN = multiprocessing.get_context("spawn")
MARGIN = 0.005


def call_for(
    redis_url: str,
    prefix: str,
    account: str,
    rate: float,
    threads: int,
    go: Queue[float],
    duration: float,
    out: Queue[Any],
    sandbox: tuple[str, str] | None = None,
) -> None:
    """Say ready on ``out``, take a start time from ``go``, run ``threads`` callers of
    ``account`` from then for ``duration`` seconds (wall clock), and put on ``out`` the
    wall-clock start time of every granted call, with the HTTP status of each call when
    ``sandbox`` = (base URL, secret) is given.

    A granted call to the sandbox is a token request (rate limited like every route), with
    ``account`` as client_id. A caller told SlotTooFar sleeps ``retry_in`` and comes back with
    the slot held for it (if one was), as a rescheduled job would. A 429 penalizes the key, as
    the API client does.
    """
    client = redis.Redis.from_url(redis_url)
    limiter = RateLimiter(redis=client, keys=Keys(prefix), margin=MARGIN)
    starts: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    out.put("ready")  # imports done: a loaded host may take seconds to get here
    start_at = go.get(timeout=120)

    def caller() -> None:
        session = requests.Session()
        time.sleep(max(0.0, start_at - time.time()))
        hold: float | None = None
        while time.time() < start_at + duration:
            try:
                limiter.acquire(account, rate, hold=hold)
            except SlotTooFar as far:
                hold = far.hold
                time.sleep(far.retry_in)
                continue
            hold = None
            now = time.time()
            status = 0
            if sandbox is not None:
                url, secret = sandbox
                response = session.post(
                    f"{url}/oauth/token",
                    auth=(account, secret),
                    data={"grant_type": "client_credentials"},
                    timeout=5,
                )
                status = response.status_code
                if status == 429:
                    limiter.penalize(account, float(response.headers.get("Retry-After", 1)))
            with lock:
                starts.append(now)
                statuses.append(status)
        session.close()

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((account, starts, statuses))


def run_processes(
    redis_url: str,
    prefix: str,
    plan: list[tuple[str, int]],
    rate: float,
    duration: float,
    sandbox: tuple[str, str] | None = None,
    statuses: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Start one process per (account, threads) in ``plan``; return start times per account
    (and fill ``statuses`` with the HTTP statuses per account, when given)."""
    out: Queue[Any] = SPAWN.Queue()
    go: Queue[float] = SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=call_for,
            args=(redis_url, prefix, account, rate, threads, go, duration, out, sandbox),
        )
        for account, threads in plan
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert out.get(timeout=120) == "ready"
    start_at = time.time() + 0.2  # every process is ready: all start together
    for _ in procs:
        go.put(start_at)
    results: dict[str, list[float]] = {}
    for _ in procs:
        account, starts, codes = out.get(timeout=duration + 30)
        results.setdefault(account, []).extend(starts)
        if statuses is not None:
            statuses.setdefault(account, []).extend(codes)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    return results


def penalize_then_report(redis_url: str, prefix: str, account: str, out: Queue[Any]) -> None:
    """In another process: penalize ``account`` for 0.8 s; report Redis TIME just before (the
    penalty starts no earlier, so no call may start before that time + 0.8 s; a time read after
    the penalty could be later than its start by the reply's latency under load)."""
    client = redis.Redis.from_url(redis_url)
    secs, micros = client.time()
    RateLimiter(redis=client, keys=Keys(prefix), margin=MARGIN).penalize(account, 0.8)
    out.put(secs + micros / 1e6)


def test_a_penalty_from_one_process_delays_the_next_call_of_another(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    limiter = RateLimiter(redis=redis_client, keys=Keys(key_prefix), margin=MARGIN, max_wait=2.0)
    assert limiter.acquire("acme", 5.0) < 0.05  # the key is idle: go now
    out: Queue[Any] = SPAWN.Queue()
    proc = SPAWN.Process(target=penalize_then_report, args=(redis_url, key_prefix, "acme", out))
    proc.start()
    penalized_at = out.get(timeout=20)
    proc.join(10)
    assert proc.exitcode == 0
    limiter.acquire("acme", 5.0)
    secs, micros = redis_client.time()
    # This process's next call could only start 0.8 s after the other process's penalty.
    assert secs + micros / 1e6 - penalized_at >= 0.8


def book_and_hang(
    redis_url: str, prefix: str, account: str, count: int, max_ahead: float, out: Queue[Any]
) -> None:
    """Book slots of ``account`` (to sleep on within 0.5 s, held beyond it) without using
    them, report the last one, then hang."""
    limiter = RateLimiter(
        redis=redis.Redis.from_url(redis_url), keys=Keys(prefix), margin=MARGIN, max_ahead=max_ahead
    )
    bookings = [limiter.reserve(account, 5.0, 0.5) for _ in range(count)]
    granted = [b for b in bookings if b.granted]
    out.put((len(granted), granted[-1].slot, max(b.wait for b in granted)))
    time.sleep(60)  # a caller stuck before sending; it is killed here


def test_reservations_of_a_killed_process_starve_no_one_beyond_the_cap(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    out: Queue[Any] = SPAWN.Queue()
    proc = SPAWN.Process(target=book_and_hang, args=(redis_url, key_prefix, "acme", 100, 2.0, out))
    proc.start()
    granted, last_slot, furthest = out.get(timeout=20)
    # 100 attempts, but only slots within max_ahead=2 s could be booked (about ten of them).
    assert 10 <= granted <= 12
    assert furthest <= 2.0
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    limiter = RateLimiter(redis=redis_client, keys=Keys(key_prefix), margin=MARGIN, max_wait=2.5)
    booking = limiter.wait_for_slot("acme", 5.0, 2.5)
    # The dead process's slots are honoured, and cost at most the cap (2 s of the key).
    assert booking.slot == pytest.approx(last_slot + 0.2 + MARGIN, abs=1e-6)
    assert booking.wait <= 2.0 + 0.2 + MARGIN
    # And the key then runs at its rate again.
    nxt = limiter.reserve("acme", 5.0, 2.5)
    assert nxt.slot == pytest.approx(booking.slot + 0.2 + MARGIN, abs=1e-6)
