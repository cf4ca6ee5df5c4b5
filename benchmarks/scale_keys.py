"""Many keys on the distributed engines (issue 14): a fleet on a three-master Redis Cluster and
RabbitMQ against the sandbox at 5 requests/s per key, every key always with polls due.

What runs, all on this machine: a three-master cluster (tests/cluster_topology.py), a private
vhost on the local RabbitMQ (or a private server: tests/rabbitmq_server.py), the sandbox with
``--keys`` clients at 5/s each (sliding window: a 429 for any sixth call in a second), and
`paypoll worker --processes P --threads T` with PAYPOLL_REDIS_URL=redis+cluster://... and
PAYPOLL_BROKER_URL=amqp://.... ``--per-key`` payments per key are submitted through the
producer; once all are created (only polls remain; the poll schedule is shortened to 0.5-1 s,
as in benchmarks/throughput.py, so the limiter, not the planner's share, bounds the calls) the
API calls answered by the sandbox are counted for ``--duration`` seconds, with:
- worker CPU (utime+stime of the worker processes) per call,
- Redis commands per call (INFO commandstats summed over the masters, the benchmark's own
  INFO calls taken out) and Redis CPU per call (the masters' processes),
- RabbitMQ CPU per call (the server's beam.smp: shared with whatever else uses that server),
- 429s and the most calls any key had accepted in one second.
``--redis single`` runs the same on one redis-server with the Redis broker, for comparison.

    .venv/bin/python benchmarks/scale_keys.py --keys 1000 [--redis cluster|single] [--write-docs]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FleetProcess,
    cpu_seconds,
    machine,
    make_accounts,
    sandbox_totals,
    scrape,
    settings_for,
    stack,
)
from common import write_section as write_docs_section

from tests.cluster_topology import running_cluster
from tests.rabbitmq_server import rabbitmq_broker

RATE = 5.0


def commands(ports: list[int]) -> int:
    """Commands the servers on ``ports`` ran so far (INFO commandstats, every command)."""
    import redis

    total = 0
    for port in ports:
        stats = redis.Redis(port=port).info("commandstats")
        total += sum(int(v["calls"]) for v in stats.values())
    return total


def stuck_creates(producer: Any) -> list[dict[str, Any]]:
    """The records not yet pending, with their schedule (due / in flight)."""
    store = producer.store
    keys = store.keys
    out = []
    for record in [r for s in ("queued", "creating") for r in producer.list_payments(state=s)]:
        raw = store.redis.hgetall(keys.payment(record.account, record.reference_id))
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if fields.get("state") not in ("queued", "creating"):
            continue  # created between the state set's read and the record's
        out.append(
            {
                **{k: fields.get(k) for k in ("state", "phase", "attempts", "last_error")},
                "account": record.account,
                "due_create": store.redis.zscore(
                    keys.due(record.account, "create"), record.reference_id
                ),
                "inflight_create": store.redis.zscore(
                    keys.inflight(record.account, "create"), record.reference_id
                ),
                "held": store.redis.zscore(
                    keys.held(record.account, "create"), record.reference_id
                ),
            }
        )
    return out


def rabbit_pids() -> list[int]:
    done = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


@contextlib.contextmanager
def engines(kind: str) -> Iterator[tuple[dict[str, str], list[Any]]]:
    """The env naming the engines, and the redis servers to measure."""
    if kind == "single":
        yield {}, []
        return
    with running_cluster() as cluster, rabbitmq_broker() as (rabbit, why_not):
        if rabbit is None:
            raise SystemExit(f"needs RabbitMQ: {why_not}")
        with rabbit.vhost() as vhost:
            env = {"PAYPOLL_REDIS_URL": cluster.url, "PAYPOLL_BROKER_URL": rabbit.url(vhost)}
            yield env, list(cluster.servers)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from worker.producer import Producer
    from worker.store import PaymentSpec

    accounts = make_accounts(args.keys)
    poll_env = {
        "PAYPOLL_POLL_POLICY": "backoff",
        "PAYPOLL_POLL_FIRST_DELAY": "0.5",
        "PAYPOLL_POLL_FACTOR": "1",
        "PAYPOLL_POLL_MAX_DELAY": "1",
    }
    with engines(args.redis) as (engine_env, servers):
        env = {**poll_env, **engine_env}
        with stack(
            accounts, account_rate=RATE, env=env, rate=RATE, pay_after="3600:7200", seed=1
        ) as st:
            servers = servers or [st.redis]
            ports = [s.port for s in servers]
            producer = Producer.from_settings(settings_for(st))
            specs = [
                PaymentSpec(a.name, f"sk-{a.name}-{i}", "10", "USD", "https://shop.example/ok")
                for i in range(args.per_key)
                for a in accounts
            ]
            for start in range(0, len(specs), 1000):
                assert all(r is True for r in producer.submit_specs(specs[start : start + 1000]))
            fleet = FleetProcess(st, processes=args.processes, threads=args.threads, metrics=True)
            try:
                launched = time.monotonic()
                pids = fleet.wait_workers(timeout=600)
                startup = time.monotonic() - launched
                deadline = time.monotonic() + 300
                while producer.counts()["pending"] < len(specs):
                    if time.monotonic() > deadline:
                        # Measure anyway, and say which creates did not finish and where they
                        # stand (the store's record and schedule).
                        stuck = stuck_creates(producer)
                        print("STUCK", len(stuck), stuck[:3], flush=True)
                        break
                    time.sleep(1)
                else:
                    stuck = []
                time.sleep(3)
                scraped = time.monotonic()
                m0 = scrape(fleet.metrics_url, timeout=300)
                scrape_seconds = time.monotonic() - scraped
                s0 = sandbox_totals(st.sandbox.stats(payments=False))
                c0, r0 = cpu_seconds(pids), cpu_seconds([s.process.pid for s in servers])
                q0 = cpu_seconds(rabbit_pids()) if args.redis == "cluster" else 0.0
                k0 = commands(ports)
                t0 = time.monotonic()
                time.sleep(args.duration)
                elapsed = time.monotonic() - t0
                k1 = commands(ports)
                s1 = sandbox_totals(st.sandbox.stats(payments=False))
                c1, r1 = cpu_seconds(pids), cpu_seconds([s.process.pid for s in servers])
                q1 = cpu_seconds(rabbit_pids()) if args.redis == "cluster" else 0.0
                m1 = scrape(fleet.metrics_url, timeout=300)
            finally:
                fleet.stop()
    calls = s1[0] - s0[0]
    # k0 and k1 each cost one INFO per server: taken out.
    redis_commands = k1 - k0 - len(ports)
    jobs = {
        k.split("=", 1)[1].rstrip("}"): m1[k] - m0.get(k, 0.0)
        for k in m1
        if k.startswith("paypoll_jobs_total{") and m1[k] - m0.get(k, 0.0)
    }
    return {
        "keys": args.keys,
        "engines": "Redis Cluster (3 masters) + RabbitMQ"
        if args.redis == "cluster"
        else "one Redis (Redis broker)",
        "config": f"{args.processes}x{args.threads}",
        "seconds": elapsed,
        "calls": calls,
        "per_second": calls / elapsed,
        "allowed": RATE * args.keys,
        "rate_limited": s1[1] - s0[1],
        "max_in_1s": s1[2],
        "worker_ms_per_call": 1000 * (c1 - c0) / max(calls, 1),
        "worker_cores": (c1 - c0) / elapsed,
        "redis_commands_per_call": redis_commands / max(calls, 1),
        "redis_ms_per_call": 1000 * (r1 - r0) / max(calls, 1),
        "rabbit_ms_per_call": 1000 * (q1 - q0) / max(calls, 1),
        "jobs": jobs,
        "startup": startup,
        "scrape": scrape_seconds,
        "stuck": stuck,
    }


def render(results: list[dict[str, Any]], what: str, start_machine: str) -> str:
    lines = [
        f"### {results[0]['keys']:,} keys on Redis Cluster and RabbitMQ (issue 14)",
        "",
        f"What: `{what}`. Machine: {start_machine}. Redis, RabbitMQ, the sandbox, the fleet and "
        "this script share the 2 cores.",
        "",
        "Every key always has polls due (the schedule shortened to 0.5-1 s, as in the fleet "
        "throughput benchmark); API calls answered by the sandbox counted over the window. "
        "Redis commands per call: INFO commandstats of every master (the polls, the sweeper, "
        "heartbeats, the exporter, the relay; the commands a Lua script runs count too). RabbitMQ CPU: the server's beam.smp process, "
        "which other vhosts on that server may share.",
        "",
        "| engines | keys | processes x threads | window | API calls/s | of allowed | 429s | "
        "max per key in 1 s | worker CPU per call | worker cores | Redis commands per call | "
        "Redis CPU per call | RabbitMQ CPU per call | jobs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['engines']} | {r['keys']:,} | {r['config']} | {r['seconds']:.0f} s | "
            f"{r['per_second']:.0f} | {r['per_second'] / r['allowed']:.1%} of "
            f"{r['allowed']:,.0f} | {r['rate_limited']} | {r['max_in_1s']} | "
            f"{r['worker_ms_per_call']:.2f} ms | {r['worker_cores']:.2f} | "
            f"{r['redis_commands_per_call']:.1f} | {r['redis_ms_per_call']:.3f} ms | "
            f"{r['rabbit_ms_per_call']:.3f} ms | "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["jobs"].items()))
            + " |"
        )
    lines += [
        "",
        "Fleet start (spawned to every worker process started): "
        + "; ".join(f"{r['engines']} {r['startup']:.0f} s" for r in results)
        + ". One scrape of the fleet's /metrics (under this load): "
        + "; ".join(f"{r['engines']} {r['scrape']:.1f} s" for r in results)
        + " (Prometheus's default scrape timeout is 10 s).",
        *(
            f"Creates not finished 300 s after the fleet started ({r['engines']}; the window was "
            f"measured anyway): {len(r['stuck'])}, by state and last error: "
            + "; ".join(
                f"{n} {state}, {error or 'no error'}"
                for (state, error), n in collections.Counter(
                    (x["state"], (x["last_error"] or "").split(";")[0]) for x in r["stuck"]
                ).most_common(3)
            )
            + f"; {sum(1 for x in r['stuck'] if x['due_create'] is not None)} of them due, "
            f"{sum(1 for x in r['stuck'] if x['inflight_create'] is not None)} in flight."
            for r in results
            if r["stuck"]
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--per-key", type=int, default=10)
    parser.add_argument("--redis", choices=("cluster", "single", "both"), default="both")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--include", help="a JSON file of an earlier run's results (--save) to show first"
    )
    parser.add_argument("--save", help="write this run's results to this JSON file")
    args = parser.parse_args()
    start_machine = machine()
    kinds = ["cluster", "single"] if args.redis == "both" else [args.redis]
    results = json.loads(Path(args.include).read_text()) if args.include else []
    for kind in kinds:
        args.redis = kind
        result = run(args)
        print(result, flush=True)
        results.append(result)
    if args.save:
        Path(args.save).write_text(json.dumps(results))
    text = render(results, "benchmarks/scale_keys.py " + " ".join(sys.argv[1:]), start_machine)
    print(text)
    if args.write_docs:
        write_docs_section("scale-keys", text)


if __name__ == "__main__":
    main()
