"""What paypoll keeps in Redis per payment and per key (issue 14, docs/scaling.md's memory rows).

On a private redis-server (jemalloc, Redis 7), through the real store (worker/store: the same
Lua scripts as the pipeline): N payments on K accounts are submitted (``queued``: record, state
set, due create), moved as the create step moves them (``creating`` with its sent-mark, then
``pending`` with a payment id, url and first poll due: record, state set, due track, pending
age, not-before), polled once (the track step's fields), then moved to ``paid``. After each
stage: ``used_memory`` (INFO memory) minus the empty server's, divided by N. The events stream
is measured apart (one entry per transition, capped at PAYPOLL_EVENTS_MAXLEN): bytes per entry.
The fields written are those the steps write, with values shaped like the API's (a 24-hex id,
a hosted url); they are not the API's values.

    .venv/bin/python benchmarks/redis_memory.py [--payments 20000] [--accounts 10] [--write-docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine
from common import write_section as write_docs_section

from tests.redis_server import RedisServer
from worker.keys import Keys
from worker.store import PaymentSpec, PaymentStore, State
from worker.store.store import NOW

BATCH = 500


def used(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def run(payments: int, accounts: int) -> dict[str, float]:
    import redis

    server = RedisServer()
    server.start()
    try:
        client = redis.Redis(port=server.port)
        keys = Keys("mem")
        store = PaymentStore(redis=client, keys=keys, events_maxlen=10**9)
        names = [f"acct{i:03d}" for i in range(accounts)]
        refs = [(names[i % accounts], f"order-{i:08d}") for i in range(payments)]
        base = used(client)
        figures: dict[str, float] = {}
        for start in range(0, payments, BATCH):
            store.submit_many(
                [
                    PaymentSpec(a, r, "125.00", "USD", f"https://shop.example.com/orders/{r}/done")
                    for a, r in refs[start : start + BATCH]
                ]
            )
        figures["queued"] = used(client) - base
        for n, (a, r) in enumerate(refs):
            store.transition(
                a, r, State.CREATING, next_step="create", fields={"phase": "sent", "sent_at": NOW}
            )
            pid = f"pay_{n:024x}"
            store.transition(
                a,
                r,
                State.PENDING,
                next_step="track",
                delay=5.0,
                not_before=1.0,
                fields={
                    "phase": "",
                    "payment_id": pid,
                    "url": f"https://pay.alternativepayments.io/checkout/{pid}",
                    "api_status": "pending",
                    "created_at": NOW,
                    "last_error": "",
                },
            )
        figures["pending"] = used(client) - base
        for a, r in refs:
            store.transition(
                a,
                r,
                State.PENDING,
                sources=[State.PENDING],
                next_step="track",
                delay=5.0,
                fields={"api_status": "pending", "errors": 0, "last_error": "", "polled_at": NOW},
                increments={"polls": 1},
            )
        figures["pending_polled"] = used(client) - base
        for a, r in refs:
            store.transition(
                a,
                r,
                State.PAID,
                fields={"api_status": "paid", "errors": 0, "last_error": "", "polled_at": NOW},
                increments={"polls": 1},
            )
        figures["paid"] = used(client) - base
        events = int(client.xlen(keys.events()))
        before = used(client)
        client.delete(keys.events())
        figures["events_stream"] = before - used(client)
        figures["events"] = events
        return figures
    finally:
        server.cleanup()


def report(payments: int, accounts: int, figures: dict[str, float], what: str) -> str:
    per_event = figures["events_stream"] / figures["events"]
    # Each stage's used_memory holds the stream as it was then: 1, 3, 3 and 4 entries per
    # payment (a poll that finds it pending appends none); taken out at the measured size.
    entries = {"queued": 1, "pending": 3, "pending_polled": 3, "paid": 4}
    per = {k: figures[k] / payments - n * per_event for k, n in entries.items()}
    lines = [
        "### Redis memory per payment (issue 14)",
        "",
        f"What: `{what}`. Machine: {machine()}.",
        "",
        f"{payments:,} payments on {accounts} accounts through the real store scripts on a "
        "private redis-server; `used_memory` above the empty server's after each stage, per "
        "payment (the events stream measured apart, below). Field values are shaped like the "
        "API's, not taken from it.",
        "",
        "| stage | bytes per payment (events stream excluded) |",
        "|---|---|",
        f"| queued (record, state set, due create) | {per['queued']:.0f} |",
        f"| pending (payment id, url; due track, pending age, not-before) | {per['pending']:.0f} |",
        f"| pending, polled once | {per['pending_polled']:.0f} |",
        f"| paid (final: the record and the state set stay; no retention) | {per['paid']:.0f} |",
        "",
        f"Events stream: {per_event:.0f} bytes per entry ({int(figures['events']):,} entries, "
        "4 per payment here); it is capped at `PAYPOLL_EVENTS_MAXLEN` (default 100,000 entries: "
        f"about {per_event * 100_000 / 2**20:.0f} MiB).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=20_000)
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    what = "benchmarks/redis_memory.py " + " ".join(sys.argv[1:])
    started = time.monotonic()
    figures = run(args.payments, args.accounts)
    text = report(args.payments, args.accounts, figures, what.strip())
    print(text)
    print(f"({time.monotonic() - started:.0f} s)")
    if args.write_docs:
        write_docs_section("redis-memory", text)


if __name__ == "__main__":
    main()
