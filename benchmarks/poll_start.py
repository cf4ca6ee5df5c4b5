"""A poll's Redis part, before and after poll_start.lua (issue 14): the client CPU and Redis CPU of
starting a track step and booking its GET's slot, as two scripts (``PaymentStore.start_step``
then ``RateLimiter.reserve``, what a worker's poll sent before) or as one (``PollStarter.start``).

One thread, a private redis-server, ``--accounts`` accounts with one pending payment each, its
track step in flight; the two ways take turns in ``--rounds`` rounds (which goes first
alternates), each round one poll start per account. The limiter's ``max_ahead`` is set far out
so every booking writes (slots pile up 0.2 s apart per key): both ways do the same work in
Redis. Client CPU is this process's ``time.process_time``, Redis CPU the server's
``used_cpu_user + used_cpu_sys`` (INFO cpu), both per poll.

    .venv/bin/python benchmarks/poll_start.py [--accounts 1000] [--rounds 10] [--write-docs]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_section

from tests.redis_server import RedisServer
from worker.keys import Keys
from worker.poll_start import PollStarter
from worker.ratelimit import RateLimiter
from worker.store import PaymentStore

RATE = 5.0
MAX_WAIT = 1.0
LEASE = 30.0


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(
    client: redis.Redis, accounts: Sequence[str], start: Callable[[str], None]
) -> tuple[float, float, float]:
    """(client CPU s, Redis CPU s, wall s) per poll start, over one start per account."""
    server_before = redis_cpu(client)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    for account in accounts:
        start(account)
    cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    server = redis_cpu(client) - server_before
    n = len(accounts)
    return cpu / n, server / n, wall / n


def run(count: int, rounds: int) -> str:
    server = RedisServer()
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        keys = Keys("bench")
        store = PaymentStore(redis=client, keys=keys)
        limiter = RateLimiter(redis=client, keys=keys, max_ahead=1e7)
        polls = PollStarter(redis_client=client, keys=keys, limiter=limiter)
        accounts = [f"acct{i:04d}" for i in range(count)]
        for a in accounts:
            store.register_tracking(a, "r1", f"pay_{a}")
        claims = store.claim_due_many({a: 1 for a in accounts}, lease=LEASE, batch=1)
        assert all(c.tracks == ["r1"] for c in claims.values())

        def two_scripts(account: str) -> None:
            store.start_step(account, "track", "r1", owner="bench", lease=LEASE)
            limiter.reserve(account, RATE, MAX_WAIT)

        def one_script(account: str) -> None:
            started = polls.start(
                account, "r1", owner="bench", lease=LEASE, rate=RATE, max_wait=MAX_WAIT
            )
            assert started.slot is not None

        ways = {"start_step + reserve (two scripts)": two_scripts, "poll_start (one)": one_script}
        for way in ways.values():  # scripts loaded, connection made
            measure(client, accounts[:10], way)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
        for r in range(rounds):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))
            for name in order:
                results[name].append(measure(client, accounts, ways[name]))
        client.close()
    finally:
        server.cleanup()

    rows = []
    medians: dict[str, tuple[float, float, float]] = {}
    for name, runs in results.items():
        cpu = statistics.median(x[0] for x in runs) * 1e6
        srv = statistics.median(x[1] for x in runs) * 1e6
        wall = statistics.median(x[2] for x in runs) * 1e6
        medians[name] = (cpu, srv, wall)
        rows.append(f"| {name} | {cpu:.0f} us | {srv:.0f} us | {wall:.0f} us |")
    (two, one) = medians.values()
    return "\n".join(
        [
            "### A poll's Redis part: one script instead of two",
            "",
            f"What: `.venv/bin/python benchmarks/poll_start.py --accounts {count} --rounds "
            f"{rounds}` (its docstring says what is measured). Machine: {machine()}.",
            "",
            "| way | client CPU per poll start (median of rounds) | Redis CPU per poll start "
            "| wall per poll start |",
            "|---|---|---|---|",
            *rows,
            "",
            f"One script costs {one[0] / two[0]:.2f} of two's client CPU, {one[1] / two[1]:.2f} of "
            f"their Redis CPU and {one[2] / two[2]:.2f} of their wall time "
            f"(saved per poll: {two[0] - one[0]:.0f} us client CPU, {two[1] - one[1]:.0f} us "
            "Redis CPU).",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(argv)
    text = run(args.accounts, args.rounds)
    print(text)
    if args.write_docs:
        write_section("poll-start", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
