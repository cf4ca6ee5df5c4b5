"""What one sweeper pass costs per account, and how many accounts one shard drives.

A private redis-server, N configured accounts in one shard (the sweeper of a shard is the same
code as the single sweeper of old: ``Sweeper.run_pass`` over its accounts), passes run
back-to-back in this process with the default settings (planner policy, 0.25 s interval):

- ``idle``: accounts with nothing due (the steady state of most keys of a large fleet);
- ``due``: every account has 20 queued creates, so each pass claims and dispatches about one
  create per account (the planner's create pace at 5 req/s: 1.25 per 0.25 s pass). Dispatch is
  a counter here, not a dramatiq enqueue (its cost belongs to the actors, issue 14 part 4).

Per pass: wall time (median, and mean with the passes that also plan), the sweeper thread's CPU (``time.thread_time``) and Redis's own time
(``INFO commandstats``: the usec of every command run, this client being Redis's only one).
Then, per shard count, the cost of one lease check (``SweeperThread.check_leases``: the live
processes, then one pipeline of a GET per shard).

    .venv/bin/python benchmarks/sweeper_shards.py [--accounts 250,1000,4000] [--write-docs]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from benchmarks.common import machine, write_section  # noqa: E402
from tests.redis_server import running_redis  # noqa: E402
from worker import defaults  # noqa: E402
from worker.keys import Keys  # noqa: E402
from worker.producer import Producer  # noqa: E402
from worker.settings import Account, Secret, Settings  # noqa: E402
from worker.store import PaymentStore  # noqa: E402
from worker.sweeper import Sweeper, SweeperThread  # noqa: E402

PASSES = 12  # measured passes per case (after 2 warm-up passes)
DUE_PER_ACCOUNT = 20  # queued creates per account in the "due" case: enough for every pass


def redis_usec(client: redis.Redis) -> float:
    """Microseconds Redis spent in commands so far (all of them)."""
    stats = client.info("commandstats")
    return float(sum(v["usec"] for v in stats.values()))


def settings_for(url: str, prefix: str, count: int, shards: int = 1) -> Settings:
    accounts = {f"k{i:05d}": Account(f"k{i:05d}", f"c{i}", Secret("s"), 5.0) for i in range(count)}
    return Settings(redis_url=url, key_prefix=prefix, accounts=accounts, sweeper_shards=shards)


def measure(client: redis.Redis, settings: Settings, *, due: bool) -> dict[str, float]:
    store = PaymentStore(
        redis=client, keys=Keys(settings.key_prefix), events_maxlen=settings.events_maxlen
    )
    if due:
        producer = Producer(settings=settings, store=store)
        for account in settings.accounts:
            for j in range(DUE_PER_ACCOUNT):
                producer.store.submit(
                    producer.validate(
                        account=account,
                        amount="5",
                        currency="USD",
                        redirect_url="https://shop.test/ok",
                        reference_id=f"r{j}",
                    )
                )
    sent = [0]

    def send(step: str, account: str, ref: str) -> None:
        sent[0] += 1

    sweeper = Sweeper(settings=settings, store=store, send=send)
    for _ in range(2):
        sweeper.run_pass()
        time.sleep(settings.sweep_interval)
    walls, cpus, rds = [], [], []
    sent[0] = 0
    for _ in range(PASSES):
        time.sleep(settings.sweep_interval)  # the planner's pacers accrue as between passes
        r0, c0, w0 = redis_usec(client), time.thread_time(), time.perf_counter()
        sweeper.run_pass()
        w1, c1, r1 = time.perf_counter(), time.thread_time(), redis_usec(client)
        walls.append(w1 - w0)
        cpus.append(c1 - c0)
        rds.append((r1 - r0) / 1e6)
    n = len(settings.accounts)
    return {
        "accounts": n,
        "wall_ms": statistics.median(walls) * 1e3,
        "wall_max_ms": max(walls) * 1e3,
        "cpu_us_per_account": statistics.median(cpus) / n * 1e6,
        "redis_us_per_account": statistics.median(rds) / n * 1e6,
        "wall_us_per_account": statistics.median(walls) / n * 1e6,
        # With the passes that also planned (every PLAN_REFRESH, 1 s: every 4th pass here).
        "mean_us_per_account": statistics.mean(walls) / n * 1e6,
        "dispatched_per_pass": sent[0] / PASSES,
    }


def lease_check(client: redis.Redis, url: str, prefix: str, shards: int) -> float:
    """Median seconds of one lease check of a process leading every one of ``shards``."""
    settings = settings_for(url, prefix, 0, shards)
    store = PaymentStore(redis=client, keys=Keys(prefix), events_maxlen=settings.events_maxlen)
    thread = SweeperThread(
        Sweeper(settings=settings, store=store, send=lambda *s: None), redis_client=client
    )
    thread.beat()
    took = []
    for _ in range(50):
        began = time.perf_counter()
        thread.check_leases()
        took.append(time.perf_counter() - began)
    return statistics.median(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", default="250,1000,4000")
    parser.add_argument("--due-accounts", type=int, default=1000)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    where = machine()
    rows = []
    with running_redis() as server:
        client = redis.Redis.from_url(server.url)
        for count in [int(c) for c in args.accounts.split(",")]:
            rows.append(
                (
                    "idle",
                    measure(client, settings_for(server.url, f"idle{count}", count), due=False),
                )
            )
            print(rows[-1], flush=True)
        due = measure(client, settings_for(server.url, "due", args.due_accounts), due=True)
        rows.append(("due", due))
        print(rows[-1], flush=True)
        checks = {s: lease_check(client, server.url, f"lease{s}", s) for s in (1, 4, 16, 64)}
        print(checks, flush=True)
    interval = defaults.SWEEP_INTERVAL
    lines = [
        "### Sweeper shards: a pass's cost per account",
        "",
        "`benchmarks/sweeper_shards.py`: one shard's passes (`Sweeper.run_pass`, planner "
        f"policy, default settings) over N accounts, {PASSES} passes each, {interval} s apart, "
        "against a private redis-server; dispatch counted, not enqueued. CPU is the sweeper "
        "thread's, Redis time is Redis's own (INFO commandstats).",
        f"Machine: {where}.",
        "",
        "| case | accounts | pass p50 (ms) | pass max (ms) | wall / account (us) | "
        "with plans (us) | CPU / account (us) | Redis / account (us) | dispatched / pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, r in rows:
        lines.append(
            f"| {case} | {r['accounts']:.0f} | {r['wall_ms']:.1f} | {r['wall_max_ms']:.1f} | "
            f"{r['wall_us_per_account']:.0f} | {r['mean_us_per_account']:.0f} | "
            f"{r['cpu_us_per_account']:.0f} | "
            f"{r['redis_us_per_account']:.0f} | {r['dispatched_per_pass']:.0f} |"
        )
    # The passes that plan count too: at the default interval a shard pays for 4 passes and one
    # plan per account each second. The largest case whose passes fit the interval sets it
    # (a larger one runs its passes back to back, so it plans at every pass).
    fitting = [r for _, r in rows if r["wall_ms"] / 1e3 < interval] or [r for _, r in rows]
    worst = max(r["mean_us_per_account"] for r in fitting) / 1e6
    per_shard = int(interval / 2 / worst)
    lines += [
        "",
        "Lease check of a process leading every shard (two round trips: the live processes, "
        "a pipeline of a GET per shard), median: "
        + ", ".join(f"{s} shards {t * 1e3:.2f} ms" for s, t in checks.items())
        + ".",
        "",
        f"One shard drives about **{per_shard:,} accounts** at the default {interval} s "
        "interval if its pass may take half the interval (the rest: wake-up passes and "
        "slack), from the costliest case whose passes fit the interval, its plans included "
        f"({worst * 1e6:.0f} us per account); {int(interval / worst):,} fill the whole "
        "interval. A shard whose passes outlast the interval runs them back to back and "
        "plans at every pass (past PLAN_REFRESH), which is why the largest case costs more "
        "per account: split it.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_section("sweeper-shards", text)


if __name__ == "__main__":
    main()
