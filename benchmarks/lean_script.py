"""A hot-path script call through redis-py's ``Script`` and through ``LeanScript`` (issue 14):
the client CPU of one EVALSHA, on one thread and on several at once.

The script has a poll start's shape: 7 keys and 8 arguments in, a payment record (a hash of
20 fields, read with HGETALL) and the Redis clock out; it changes nothing, so every call does
the same work. A private redis-server; the two ways take turns in ``--rounds`` rounds (which
goes first alternates), each round ``--calls`` calls per thread. Client CPU is this process's
``time.process_time`` (every thread's) per call, wall the round's time per call.

    .venv/bin/python benchmarks/lean_script.py [--calls 5000] [--rounds 6] [--threads 1,8]
        [--write-docs]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_section

from tests.redis_server import RedisServer
from worker.lean_script import close_lean_connections, register_lean_script

SOURCE = "return {redis.call('HGETALL', KEYS[3]), redis.call('TIME'), #KEYS, #ARGV}"
KEYS = [f"{{bench:acct}}:{name}" for name in ("inflight", "owners", "pay", "a", "b", "c", "d")]
ARGS = ["r1", "track", "worker-1:1234", 30.0, "pending", 5, 1.0, 1733350000]


def _round(call: Callable[[], Any], calls: int, threads: int) -> tuple[float, float]:
    """(client CPU s, wall s) per call, ``calls`` calls on each of ``threads`` threads."""
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(calls):
            call()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    start.wait()
    for w in workers:
        w.join()
    n = calls * threads
    return (time.process_time() - cpu_before) / n, (time.perf_counter() - wall_before) / n


def run(calls: int, rounds: int, thread_counts: Sequence[int]) -> str:
    server = RedisServer()
    server.start()
    rows = []
    ratios = []
    try:
        client = redis.Redis.from_url(server.url)
        client.hset(KEYS[2], mapping={f"field{i}": f"value-{i}-" + "x" * 12 for i in range(20)})
        plain = client.register_script(SOURCE)
        lean = register_lean_script(client, SOURCE)
        ways: dict[str, Callable[[], Any]] = {
            "redis-py Script": lambda: plain(keys=KEYS, args=ARGS),
            "LeanScript": lambda: lean(keys=KEYS, args=ARGS),
        }
        # The same answer (the clock aside), and the script loaded.
        want, got = ways["redis-py Script"](), ways["LeanScript"]()
        assert want[:1] + want[2:] == got[:1] + got[2:], (want, got)
        for threads in thread_counts:
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
            for r in range(rounds):
                order = list(ways) if r % 2 == 0 else list(reversed(ways))
                for name in order:
                    results[name].append(_round(ways[name], calls, threads))
            cpu = {n: statistics.median(x[0] for x in v) * 1e6 for n, v in results.items()}
            wall = {n: statistics.median(x[1] for x in v) * 1e6 for n, v in results.items()}
            for name in ways:
                rows.append(f"| {threads} | {name} | {cpu[name]:.1f} us | {wall[name]:.1f} us |")
            ratios.append(
                f"{threads} thread{'s' if threads > 1 else ''}: "
                f"{cpu['LeanScript'] / cpu['redis-py Script']:.2f} of the client CPU "
                f"({cpu['redis-py Script'] - cpu['LeanScript']:.0f} us saved per call)"
            )
        close_lean_connections(client)
        client.close()
    finally:
        server.cleanup()
    return "\n".join(
        [
            "### A hot-path script call: redis-py's Script and LeanScript",
            "",
            f"What: `.venv/bin/python benchmarks/lean_script.py --calls {calls} --rounds {rounds} "
            f"--threads {','.join(map(str, thread_counts))}` (its docstring says what is "
            f"measured). Machine: {machine()}.",
            "",
            "| threads | way | client CPU per call (median of rounds) | wall per call |",
            "|---|---|---|---|",
            *rows,
            "",
            "LeanScript: " + "; ".join(ratios) + ".",
        ]
    )


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[,N...], got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be at least 1, got {text!r}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per thread per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=_thread_counts, default=[1, 8], metavar="N[,N...]")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(argv)
    text = run(args.calls, args.rounds, args.threads)
    print(text)
    if args.write_docs:
        write_section("lean-script", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
