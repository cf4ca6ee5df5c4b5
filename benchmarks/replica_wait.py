"""What Sentinel's replica acknowledgement (`WAIT`) costs (issue 13): a create's sent-mark and
a producer's submit wait until a replica holds them.

Two parts, both on this machine:

- **Redis alone.** A master and a replica (redis-server, `--replicaof`): blocks of 100 writes
  of a 6-field hash (the size of a sent-mark), each alone, then each followed by `WAIT 1 500`,
  alternating block by block so both see the same load. The difference is one replica round
  trip.
- **The pipeline.** A real Sentinel deployment (master, replica, 3 sentinels), the sandbox, a
  `paypoll worker` fleet (1 process x 8 threads) on the `redis+sentinel://` URL, runs taking
  turns with `PAYPOLL_REDIS_WAIT_REPLICAS=1` (the default under Sentinel) and `=0`. Each run
  submits payments on 5 keys (the producer waits for its replica too when on) and waits until
  every one is created. Figures: the producer's `submit_payment` call, the time from submit to
  created, the fleet's own `paypoll_replica_wait_seconds`, creates retried for lag, 429s.

    .venv/bin/python benchmarks/replica_wait.py [--payments 100] [--rounds 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, percentile, scrape
from common import write_section as write_docs_section

from tests.fleet_harness import RunningFleet, paypoll_env, write_accounts
from tests.redis_server import RedisServer
from tests.sandbox_fixture import running_sandbox
from tests.sentinel_topology import running_sentinels
from tests.waiting import wait_until

KEYS = 5
CREATED = {"pending", "paid", "expired", "cancelled"}


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.2f} ms"


def redis_alone(blocks: int, per_block: int = 100) -> dict[str, list[float]]:
    """Seconds per write, alone and followed by WAIT 1 500, on a master with one replica."""
    import redis

    master = RedisServer()
    master.start()
    replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(master.port)])
    replica.start()
    try:
        probe = redis.Redis(port=replica.port)
        wait_until(
            lambda: probe.info("replication").get("master_link_status") == "up",
            timeout=15,
            what="replica in sync",
        )
        client = redis.Redis(port=master.port)
        fields = {"state": "creating", "phase": "sent", "sent_at": "1", "attempts": "1"}
        fields |= {"slot_hold": "", "next_step": "create"}
        took: dict[str, list[float]] = {"write": [], "write + WAIT": []}
        for block in range(blocks):
            for i in range(per_block):
                started = time.perf_counter()
                client.hset(f"rec:{block}:{i}", mapping=fields)
                took["write"].append(time.perf_counter() - started)
            for i in range(per_block):
                started = time.perf_counter()
                client.hset(f"rec:{block}:{i}", mapping=fields)
                acked = client.wait(1, 500)
                took["write + WAIT"].append(time.perf_counter() - started)
                assert acked >= 1, "the replica did not acknowledge"
        return took
    finally:
        replica.stop(kill=True)
        master.stop(kill=True)


def histogram(url: str, name: str, outcome: str) -> tuple[float, float, dict[float, float]]:
    """(count, sum, cumulative count per bucket bound) of one labelled histogram."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (our own URL)
        text = response.read().decode()
    count = total = 0.0
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(name) or f'outcome="{outcome}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith(f"{name}_count"):
            count += value
        elif line.startswith(f"{name}_sum"):
            total += value
        elif line.startswith(f"{name}_bucket"):
            found = re.search(r'le="([^"]+)"', line)
            if found:
                bound = float(found.group(1))
                buckets[bound] = buckets.get(bound, 0.0) + value
    return count, total, buckets


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """The smallest bucket bound holding at least ``q`` of the observations (an upper bound)."""
    total = max(buckets.values(), default=0.0)
    for bound in sorted(buckets):
        if total and buckets[bound] >= q * total:
            return bound
    return float("nan")


@dataclass
class Run:
    """One pipeline run's figures (seconds)."""

    wait: bool
    submit: list[float]
    to_created: list[float]
    waits: float  # WAITs the fleet made that were acknowledged
    wait_mean: float
    wait_p50: float  # bucket bounds
    wait_p99: float
    lagging: float  # WAITs with fewer acks than wanted: their creates were retried
    slot_missed: float  # creates too late for their slot once marked (nothing sent, retried)


def pipeline_run(
    url: str,
    sandbox_url: str,
    clients: dict[str, str],
    workdir: Path,
    *,
    wait: bool,
    run: int,
    payments: int,
) -> Run:
    """One fleet on ``url`` with WAIT on or off: submit ``payments``, wait until all created."""
    from worker.producer import Producer
    from worker.settings import load_settings

    prefix = f"rw{run}{'on' if wait else 'off'}"
    env = paypoll_env(
        redis_url=url,
        api_url=sandbox_url,
        key_prefix=prefix,
        accounts_file=write_accounts(workdir, clients, 5),
        redis_wait_replicas=1 if wait else 0,
    )
    producer = Producer.from_settings(load_settings(env))
    fleet = RunningFleet(env, processes=1, threads=8, log_path=workdir / f"{prefix}.log")
    try:
        fleet.wait_started()
        accounts = sorted(clients)
        refs = [(accounts[i % KEYS], f"{prefix}-{i}") for i in range(payments)]
        submit_took = []
        for account, ref in refs:
            started = time.perf_counter()
            producer.submit_payment(
                account=account, amount="5", redirect_url="https://s.test/ok", reference_id=ref
            )
            submit_took.append(time.perf_counter() - started)
        wait_until(
            lambda: all(producer.get_payment(r, account=a).state in CREATED for a, r in refs),
            timeout=180,
            interval=0.5,
            what="every payment created",
        )
        records = [producer.get_payment(r, account=a) for a, r in refs]
        to_created = [
            r.created_at - r.submitted_at for r in records if r.created_at and r.submitted_at
        ]
        name = "paypoll_replica_wait_seconds"
        count, total, buckets = histogram(fleet.metrics_url, name, "acked")
        lagging = histogram(fleet.metrics_url, name, "lagging")[0]
        jobs = scrape(fleet.metrics_url)
    finally:
        fleet.stop()
    return Run(
        wait=wait,
        submit=submit_took,
        to_created=to_created,
        waits=count,
        wait_mean=total / count if count else float("nan"),
        wait_p50=bucket_quantile(buckets, 0.5),
        wait_p99=bucket_quantile(buckets, 0.99),
        lagging=lagging,
        slot_missed=jobs.get("paypoll_jobs_total{outcome=slot_missed}", 0.0),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=100, help="per pipeline run")
    parser.add_argument("--rounds", type=int, default=2, help="pipeline runs per setting")
    parser.add_argument("--blocks", type=int, default=20, help="blocks of 100 writes (Redis)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    where = machine()

    alone = redis_alone(args.blocks)
    extra = [
        b - a for a, b in zip(sorted(alone["write"]), sorted(alone["write + WAIT"]), strict=True)
    ]
    alone_rows = [
        f"| {name} | {len(took)} | {ms(took, 50)} | {ms(took, 99)} "
        f"| {sum(took) / len(took) * 1000:.2f} ms |"
        for name, took in alone.items()
    ]
    print("\n".join(alone_rows), flush=True)

    clients = {f"rw{i}": f"rw{i}-secret-{i:04d}x" for i in range(KEYS)}
    runs = []
    with (
        running_sentinels() as topology,
        running_sandbox(
            client=[f"{c}:{s}" for c, s in clients.items()],
            rate=5,
            pay_after="30:60",  # pending through the run: creates are what is measured
            seed=5,
        ) as sandbox,
        tempfile.TemporaryDirectory(prefix="paypoll-rw-") as tmp,
    ):
        before = sandbox.stats(payments=False)
        for run in range(args.rounds):
            for wait in (True, False):
                result = pipeline_run(
                    topology.url,
                    sandbox.url,
                    clients,
                    Path(tmp),
                    wait=wait,
                    run=run,
                    payments=args.payments,
                )
                runs.append(result)
                print(
                    f"WAIT {'on' if wait else 'off'}: submit p50 {ms(result.submit, 50)}, "
                    f"{result.waits:.0f} waits, mean {result.wait_mean * 1000:.2f} ms",
                    flush=True,
                )
        stats = sandbox.stats(payments=False)
    limited = sum(c["rate_limited"] for c in stats["clients"].values()) - sum(
        c["rate_limited"] for c in before["clients"].values()
    )
    pipeline_rows = []
    for r in runs:
        wait_figures = (
            f"{r.waits:.0f} waits, mean {r.wait_mean * 1000:.2f} ms, "
            f"p50 <= {r.wait_p50 * 1000:g} ms, p99 <= {r.wait_p99 * 1000:g} ms"
            if r.wait
            else "-"
        )
        pipeline_rows.append(
            f"| {'on (1 replica)' if r.wait else 'off'} | {ms(r.submit, 50)} | {ms(r.submit, 99)} "
            f"| {ms(r.to_created, 50)} | {ms(r.to_created, 95)} | {wait_figures} "
            f"| {r.lagging:.0f} | {r.slot_missed:.0f} |"
        )
    text = "\n".join(
        [
            "### What a replica's acknowledgement costs (issue 13): `WAIT` under Sentinel",
            "",
            f"`benchmarks/replica_wait.py --payments {args.payments} --rounds {args.rounds}`: "
            f"{where}. Redis alone: a master and a replica on this host, blocks of 100 writes "
            "of a 6-field hash, alone or each followed by `WAIT 1 500`, alternating.",
            "",
            "| Redis alone | writes | p50 | p99 | mean |",
            "|---|---|---|---|---|",
            *alone_rows,
            "",
            f"One replica round trip, the difference of the sorted samples: p50 "
            f"{percentile(extra, 50) * 1000:.2f} ms, p99 {percentile(extra, 99) * 1000:.2f} ms.",
            "",
            f"The pipeline: a real Sentinel deployment (master, replica, 3 sentinels), a fleet "
            f"of 1 process x 8 threads on the `redis+sentinel://` URL, {args.payments} payments "
            f"on {KEYS} keys per run (submitted back to back; creates then go at 5/s per key, "
            "so submit to created is mostly the keys' pace), runs taking turns with "
            "`PAYPOLL_REDIS_WAIT_REPLICAS=1` and `=0`. The create's WAIT is the fleet's own "
            "`paypoll_replica_wait_seconds` (bucket bounds). 429s over all runs: "
            f"{limited}.",
            "",
            "| WAIT | submit p50 | submit p99 | submit to created p50 | p95 "
            "| create's WAIT (fleet metric) | creates retried for lag | creates late for "
            "their slot (retried) |",
            "|---|---|---|---|---|---|---|---|",
            *pipeline_rows,
        ]
    )
    print(text)
    if args.write_docs:
        write_docs_section("replica-wait", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
