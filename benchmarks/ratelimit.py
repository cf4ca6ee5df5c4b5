"""Rate limiters side by side against one private Redis and the sandbox in strict sliding mode.

Run from the repository root:  .venv/bin/python -m benchmarks.ratelimit [--duration 10]

Limiters: paypoll's (worker.ratelimit), dramatiq's WindowRateLimiter and BucketRateLimiter on
its RedisBackend (refused -> retry after a random 50-250 ms backoff), and a per-process limiter
(what Celery's rate_limit does: a local token bucket of capacity 1 per process, so N processes
send N x rate). Scenarios: one key with 32 callers in 4 processes; 100 keys at once (4 processes,
one caller per key per process, 30 s). Every granted call is a POST /oauth/token with Basic
auth, rate limited by the sandbox like every route. Then: paypoll's margin swept on the one-key
scenario, and paypoll's raw reservation capacity over 1,000 keys. Prints markdown tables (for
docs/benchmarks.md) and the raw figures as JSON. A benchmark, not a test: it asserts nothing.

The callers send with a light one-send HTTP client (``TokenCaller``) and the sandbox runs at
nice 10 by default: on a 2-core host, 500 calls/s through ``requests`` plus the emulator
saturate the CPU and the figures would measure that rather than the limiters. The 100-key
case adds paypoll rows with the ``requests`` caller and with the sandbox at nice 0 for
reference. The sandbox judges arrivals by their kernel receive timestamps, so its own
scheduling never changes a verdict.
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing
import os
import random
import resource
import statistics
import sys
import threading
import time
from importlib import resources
from multiprocessing.queues import Queue
from typing import Any

import redis

from benchmarks.token_caller import SECRET, TokenCaller
from tests.redis_server import RedisServer
from tests.sandbox_fixture import running_sandbox
from worker import metrics
from worker.errors import SlotTooFar
from worker.keys import Keys
from worker.ratelimit import RateLimiter

SPAWN = multiprocessing.get_context("spawn")
RATE = 5.0
PROCESSES = 4
# Commands Redis runs inside paypoll's scripts: counted by INFO commandstats, never sent.
SCRIPT_INTERNAL = {"cmdstat_time", "cmdstat_get", "cmdstat_set"}
ADMIN = ("cmdstat_info", "cmdstat_config", "cmdstat_flushall", "cmdstat_client", "cmdstat_hello")


class LocalSlots:
    """The per-process limiter: evenly spaced slots per key in this process only (Celery's
    rate_limit is a kombu TokenBucket of capacity 1 per worker process: the same spacing)."""

    def __init__(self, rate: float, max_wait: float) -> None:
        self.interval = 1.0 / rate
        self.max_wait = max_wait
        self.next: dict[str, float] = {}
        self.lock = threading.Lock()

    def reserve(self, key: str) -> tuple[float, bool]:
        with self.lock:
            now = time.time()
            slot = max(now, self.next.get(key, 0.0))
            if slot - now > self.max_wait:
                return slot, False
            self.next[key] = slot + self.interval
            return slot, True


def worker(spec: dict[str, Any], out: Queue[Any]) -> None:
    """One worker process: ``spec["threads"]`` threads take jobs (one per key and caller) from a
    local schedule, pass the limiter, call the sandbox, and put the job back (rescheduled when
    the limiter said so). Reports counts, slot-to-start delays and CPU on ``out``."""
    kind: str = spec["kind"]
    if spec.get("switch_interval"):
        # How long a running thread keeps the GIL before a woken one may take it (default 5 ms).
        sys.setswitchinterval(spec["switch_interval"])
    accounts: list[str] = spec["accounts"]
    start_at: float = spec["start_at"]
    end_at = start_at + spec["duration"]
    max_wait: float = spec["max_wait"]
    client = redis.Redis.from_url(spec["redis_url"])
    limiter = RateLimiter(redis=client, keys=Keys("bench"), margin=spec["margin"])
    local = LocalSlots(RATE, max_wait)
    dramatiq_limiters: dict[str, Any] = {}
    if kind.startswith("dramatiq"):
        from dramatiq.rate_limits import BucketRateLimiter, WindowRateLimiter
        from dramatiq.rate_limits.backends import RedisBackend

        backend = RedisBackend(client=client)
        for account in accounts:
            if kind == "dramatiq-window":
                dramatiq_limiters[account] = WindowRateLimiter(
                    backend, f"bench-w-{account}", limit=int(RATE), window=1
                )
            else:
                dramatiq_limiters[account] = BucketRateLimiter(
                    backend, f"bench-b-{account}", limit=int(RATE), bucket=1000
                )
    # The schedule: (due wall time, seq, account); every caller of every key is one job.
    # (due, seq, account, hold): hold is the slot paypoll's limiter held for the job, if any.
    jobs: list[tuple[float, int, str, float | None]] = [
        (start_at, i, a, None) for i, a in enumerate(accounts * spec["callers_per_key"])
    ]
    heapq.heapify(jobs)
    cond = threading.Condition()
    seq = [len(jobs)]
    lock = threading.Lock()
    sent: dict[str, int] = {}
    codes: dict[int, int] = {}
    delays: list[float] = []
    slots: list[float] = []
    refused = [0]
    held = [0]  # far answers that held a slot for the job
    granted = [0]
    limiter_cpu = [0.0]

    def put_back(due: float, account: str, hold: float | None = None) -> None:
        with cond:
            seq[0] += 1
            heapq.heappush(jobs, (due, seq[0], account, hold))
            cond.notify()

    def take() -> tuple[str, float | None] | None:
        """The next due job; after the end, only jobs coming back for a slot held for them
        (as a fleet that keeps running would use it), so that every reservation made during
        the run ends as a grant, whether it was slept on or held."""
        with cond:
            while True:
                ended = time.time() >= end_at
                if ended:
                    holding = [job for job in jobs if job[3] is not None]
                    if len(holding) < len(jobs):
                        jobs[:] = holding
                        heapq.heapify(jobs)
                    if not jobs:
                        return None
                if jobs:
                    due, _, account, hold = jobs[0]
                    if due <= time.time():
                        heapq.heappop(jobs)
                        return account, hold
                    cond.wait(due - time.time() if ended else min(due, end_at) - time.time())
                else:
                    cond.wait(end_at - time.time())

    def run() -> None:
        caller = TokenCaller(spec["url"], spec["http"])
        caller.connect()
        rng = random.Random()
        while (job := take()) is not None:
            account, hold = job
            cpu0 = time.thread_time()
            slot: float | None = None
            if kind == "paypoll":
                # The product's path (what ApiClient runs): book (or take up the slot held for
                # this job), sleep, and take one fresh slot when the wake-up came too late for
                # the booked one. A far slot is held: the job comes back for it (as an actor's
                # step is rescheduled with its hold), half of max_wait before it.
                try:
                    granted_slot = limiter.book(account, RATE, max_wait=max_wait, hold=hold)()
                except SlotTooFar as far:
                    limiter_cpu[0] += time.thread_time() - cpu0
                    with lock:
                        refused[0] += 1
                        held[0] += far.hold is not None
                    put_back(time.time() + far.retry_in, account, far.hold)
                    continue
                limiter_cpu[0] += time.thread_time() - cpu0
                with lock:
                    granted[0] += 1
                slot = granted_slot.booking.slot
            elif kind == "per-process":
                slot, ok = local.reserve(account)
                limiter_cpu[0] += time.thread_time() - cpu0
                if not ok:
                    with lock:
                        refused[0] += 1
                    put_back(slot - max_wait / 2, account)
                    continue
                with lock:
                    granted[0] += 1
                time.sleep(max(0.0, slot - time.time()))
            else:
                with dramatiq_limiters[account].acquire(raise_on_failure=False) as acquired:
                    limiter_cpu[0] += time.thread_time() - cpu0
                    if not acquired:
                        with lock:
                            refused[0] += 1
                        put_back(time.time() + rng.uniform(0.05, 0.25), account)
                        continue
                    with lock:
                        granted[0] += 1
            started = time.time()
            if started >= end_at:
                continue  # granted, not sent: the sandbox's figures cover the run only
            status, retry_header = caller.post(account)
            with lock:
                sent[account] = sent.get(account, 0) + 1
                codes[status] = codes.get(status, 0) + 1
                if slot is not None:
                    delays.append(started - slot)
                    if status != 429:
                        slots.append(slot)
            due = time.time()
            if status == 429:
                retry_after = 1.0 if retry_header is None else retry_header
                if kind == "paypoll":
                    limiter.penalize(account, retry_after)
                else:
                    due += retry_after
            put_back(due, account)
        caller.close()

    # Started before start_at: each thread connects first, then waits for the first jobs.
    threads = [threading.Thread(target=run) for _ in range(spec["threads"])]
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    late = sum(metrics.LIMITER_LATE.labels(a)._value.get() for a in accounts)
    out.put(
        {
            "sent": sent,
            "codes": codes,
            "delays": delays,
            "slots": slots,
            "refused": refused[0],
            "held": held[0],
            "granted": granted[0],
            "cpu": cpu,
            "limiter_cpu": limiter_cpu[0],
            "late_rebooks": int(late),
            "clock_probes": limiter.clock_probes,
        }
    )


def deprioritise(pid: int, niceness: int) -> None:
    """Lower the CPU priority of every thread of process ``pid`` (threads it starts later
    inherit it from their creator). Linux only; does nothing elsewhere."""
    tasks = f"/proc/{pid}/task"
    if niceness <= 0 or not os.path.isdir(tasks):
        return
    for tid in os.listdir(tasks):
        os.setpriority(os.PRIO_PROCESS, int(tid), niceness)


def client_commands(before: dict[str, Any], after: dict[str, Any], kind: str) -> int:
    """Commands clients sent between two INFO commandstats snapshots."""
    total = 0
    for name, stats in after.items():
        if name.startswith(ADMIN) or (kind == "paypoll" and name in SCRIPT_INTERNAL):
            continue
        total += stats["calls"] - before.get(name, {}).get("calls", 0)
    return total


def scenario(
    server: RedisServer,
    *,
    kind: str,
    keys: int,
    callers_per_key: int,
    threads: int,
    duration: float,
    margin: float = 0.005,
    max_wait: float = 1.0,
    switch_interval: float | None = None,
    processes: int = PROCESSES,
    http: str = "requests",
    sandbox_nice: int = 0,
) -> dict[str, Any]:
    """Run one limiter on one scenario with a fresh sandbox; return its figures."""
    admin = redis.Redis.from_url(server.url)
    admin.flushall()  # our private server: nothing else lives there
    # A running fleet has its scripts loaded: so that the first row does not pay for loading
    # them (a NOSCRIPT answer and a SCRIPT LOAD per process), load them before measuring.
    for script in ("reserve.lua", "penalize.lua"):
        admin.script_load((resources.files("worker.ratelimit") / script).read_text())
    accounts = [f"k{i:03d}" for i in range(keys)]
    clients = [f"{a}:{SECRET}" for a in accounts]
    with running_sandbox(rate=RATE, client=clients, limit_mode="sliding") as sandbox:
        deprioritise(sandbox.process.pid, sandbox_nice)
        out: Queue[Any] = SPAWN.Queue()
        start_at = time.time() + 3.0
        spec = {
            "kind": kind,
            "accounts": accounts,
            "callers_per_key": callers_per_key,
            "threads": threads,
            "start_at": start_at,
            "duration": duration,
            "redis_url": server.url,
            "url": sandbox.url,
            "margin": margin,
            "max_wait": max_wait,
            "switch_interval": switch_interval,
            "http": http,
        }
        load_before = os.getloadavg()[0]
        procs = [SPAWN.Process(target=worker, args=(spec, out)) for _ in range(processes)]
        for p in procs:
            p.start()
        time.sleep(max(0.0, start_at - time.time() - 0.3))
        before = admin.info("commandstats")
        results = [out.get(timeout=duration + 60) for _ in procs]
        after = admin.info("commandstats")
        for p in procs:
            p.join(10)
        seen = sandbox.stats(payments=False, times=True)["clients"]
    admin.close()
    sent = sum(sum(r["sent"].values()) for r in results)
    per_key = [seen.get(a, {}).get("requests", {}).get("POST /oauth/token", {}) for a in accounts]
    del per_key
    # Steady-state rate per key: accepted calls between the first and the last, so the call
    # at t=0 (a fence post) does not count as utilisation.
    shares = []
    steady = []  # the same after the first 2 s: without the start-up herd
    for a in accounts:
        times = sorted(seen.get(a, {}).get("accepted_times", []))
        shares.append((len(times) - 1) / (times[-1] - times[0]) / RATE if len(times) > 1 else 0)
        later = [t for t in times if t >= start_at + 2.0]
        steady.append((len(later) - 1) / (later[-1] - later[0]) / RATE if len(later) > 1 else 0)
    granted = sum(r["granted"] for r in results)
    refusals = sorted(
        t - start_at for a in accounts for t in seen.get(a, {}).get("rate_limited_times", [])
    )
    delays = sorted(d for r in results for d in r["delays"])
    # TIME is counted as script-internal; the limiter's own TIME probes are added back.
    probes = sum(r["clock_probes"] for r in results)
    commands = client_commands(before, after, kind) + probes
    evalshas = after.get("cmdstat_evalsha", {}).get("calls", 0) - before.get(
        "cmdstat_evalsha", {}
    ).get("calls", 0)
    needed = (
        None
        if kind != "paypoll"
        else needed_margin(
            sorted(x for r in results for x in r["slots"]),
            sorted(seen.get(accounts[0], {}).get("accepted_times", [])),
        )
    )
    return {
        "kind": kind,
        "keys": keys,
        "load_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "margin": margin,
        "max_wait": max_wait,
        "switch_interval": switch_interval,
        "http": http,
        "sandbox_nice": sandbox_nice,
        "processes": processes,
        "threads": threads,
        "sent": sent,
        "share_mean": statistics.fmean(shares),
        "share_min": min(shares),
        "share_steady_mean": statistics.fmean(steady),
        "http_429": sum(seen.get(a, {}).get("rate_limited", 0) for a in accounts),
        "max_requests_in_1s": max(seen.get(a, {}).get("max_requests_in_1s", 0) for a in accounts),
        "max_accepted_in_1s": max(seen.get(a, {}).get("max_accepted_in_1s", 0) for a in accounts),
        "refused": sum(r["refused"] for r in results),
        "held": sum(r["held"] for r in results),
        "late_rebooks": sum(r["late_rebooks"] for r in results),
        "clock_probes": probes,
        "granted": granted,
        "commands_per_grant": commands / granted if granted else float("nan"),
        "evalsha_per_grant": evalshas / granted if granted else float("nan"),
        "cpu_ms_per_call": 1000 * sum(r["cpu"] for r in results) / sent,
        "limiter_cpu_ms_per_call": 1000 * sum(r["limiter_cpu"] for r in results) / sent,
        "delay_p50_ms": 1000 * delays[len(delays) // 2] if delays else None,
        "delay_p99_ms": 1000 * delays[int(len(delays) * 0.99)] if delays else None,
        "delay_max_ms": 1000 * delays[-1] if delays else None,
        "needed_margin_ms": None if needed is None else 1000 * needed,
        "http_429_in_first_second": sum(1 for t in refusals if t < 1.0),
        "http_429_at_s": [round(t, 3) for t in refusals[:50]],
    }


def needed_margin(slots: list[float], arrivals: list[float]) -> float | None:
    """The smallest margin that would have kept this run's calls within the sandbox's window.

    With one key and calls 205 ms apart, the k-th accepted arrival is the k-th slot's call.
    Each call arrives ``d = arrival - slot`` late; calls i and i + 5 share a window (t - 1 s, t]
    iff d[i] - d[i+5] >= 5 * margin (their slots are 1 s + 5 * margin apart), so the run needed
    max(d[i] - d[i+5]) / 5. None when the lists cannot be paired (429s or several keys).
    """
    if not slots or len(slots) != len(arrivals):
        return None
    lateness = [a - s for s, a in zip(slots, arrivals, strict=True)]
    n = int(RATE)
    worst = max((lateness[i] - lateness[i + n] for i in range(len(lateness) - n)), default=0.0)
    return max(0.0, worst / n)


def capacity_worker(spec: dict[str, Any], out: Queue[Any]) -> None:
    """Reserve slots over ``spec["keys"]`` keys for ``spec["duration"]`` s; report how many.

    ``pipeline`` > 0 sends that many EVALSHA of reserve.lua per round trip; 0 calls
    RateLimiter.reserve one at a time. max_wait is an hour, so every reservation books.
    """
    client = redis.Redis.from_url(spec["redis_url"])
    limiter = RateLimiter(redis=client, keys=Keys("cap"), margin=0.005)
    accounts = [f"k{i:04d}" for i in range(spec["keys"])]
    interval_us = int(limiter.interval(RATE) * 1_000_000)
    script = client.register_script(
        resources.files("worker.ratelimit").joinpath("reserve.lua").read_text()
    )
    done = 0
    i = random.randrange(len(accounts))
    time.sleep(max(0.0, spec["start_at"] - time.time()))
    began = time.time()  # later than start_at if this interpreter started late
    end = spec["start_at"] + spec["duration"]
    while time.time() < end:
        if spec["pipeline"]:
            pipe = client.pipeline(transaction=False)
            for _ in range(spec["pipeline"]):
                i = (i + 1) % len(accounts)
                key = Keys("cap").limiter(accounts[i])
                script(keys=[key], args=[interval_us, 3600 * 1_000_000], client=pipe)
            done += sum(1 for r in pipe.execute() if r[2] == 1)
        else:
            for _ in range(100):
                i = (i + 1) % len(accounts)
                done += limiter.reserve(accounts[i], RATE, 3600.0).granted
    out.put(done / (time.time() - began))


def capacity(server: RedisServer, *, processes: int, pipeline: int, duration: float) -> float:
    """Reservations per second over 1,000 keys, Redis on the same machine."""
    redis.Redis.from_url(server.url).flushall()
    out: Queue[Any] = SPAWN.Queue()
    spec = {
        "redis_url": server.url,
        "keys": 1000,
        "pipeline": pipeline,
        "start_at": time.time() + 3.0,
        "duration": duration,
    }
    procs = [SPAWN.Process(target=capacity_worker, args=(spec, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=duration + 60) for _ in procs)
    for p in procs:
        p.join(10)
    return float(total)


def fmt(value: Any, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]], label: str) -> str:
    head = (
        f"| {label} | calls/s per key (share of limit, mean / min; mean after 2 s) | 429s | "
        "max requests in 1 s (max accepted) | far answers (slot held) | late rebooks (clock probes) | Redis commands "
        "per grant (EVALSHA per grant) | client CPU ms per call (limiter only) | slot-to-start p50 / p99 / max ms | "
        "margin needed (ms) | load avg before/after |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        name = r["kind"] if label == "limiter" else f"{r['margin'] * 1000:g} ms"
        if label == "limiter" and r["kind"] == "paypoll":
            name = f"paypoll (max_wait {r['max_wait']:g} s)"
        if label == "limiter" and (r["http"], r["sandbox_nice"]) != ("light", 10):
            name += f" [{r['http']} caller, sandbox nice {r['sandbox_nice']}]"
        lines.append(
            f"| {name} | {r['share_mean'] * RATE:.2f} ({r['share_mean']:.1%} / "
            f"{r['share_min']:.1%}; {r['share_steady_mean']:.1%}) | {r['http_429']} | "
            f"{r['max_requests_in_1s']} ({r['max_accepted_in_1s']}) | {r['refused']} "
            f"({r['held']}) | "
            f"{r['late_rebooks']} ({r['clock_probes']}) | {r['commands_per_grant']:.2f} "
            f"({r['evalsha_per_grant']:.2f}) | "
            f"{r['cpu_ms_per_call']:.2f} ({r['limiter_cpu_ms_per_call']:.3f}) | "
            f"{fmt(r['delay_p50_ms'])} / {fmt(r['delay_p99_ms'])} / {fmt(r['delay_max_ms'])} | "
            f"{fmt(r['needed_margin_ms'])} | {r['load_1min'][0]:g} / {r['load_1min'][1]:g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument(
        "--many-duration", type=float, default=30.0, help="seconds per run, 100-key case"
    )
    parser.add_argument("--margins", default="0,0.001,0.002,0.005,0.01")
    parser.add_argument("--capacity-seconds", type=float, default=5.0)
    parser.add_argument("--many-processes", type=int, default=PROCESSES, help="100-key case")
    parser.add_argument("--many-threads", type=int, default=25, help="100-key case, per process")
    parser.add_argument("--only", default="one,many,margins,capacity")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=0.0005,
        help="sys.setswitchinterval of the worker processes in the 'switch' runs",
    )
    parser.add_argument(
        "--http",
        choices=("requests", "light"),
        default="light",
        help="the callers' HTTP client (see TokenCaller)",
    )
    parser.add_argument(
        "--sandbox-nice",
        type=int,
        default=10,
        help="the sandbox's niceness: it stands in for a remote API, so it yields the CPU",
    )
    parser.add_argument(
        "--kinds",
        default="paypoll,dramatiq-window,dramatiq-bucket,per-process",
        help="limiters compared (one key and 100 keys)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="100-key case: skip paypoll's reference rows (requests caller; sandbox at nice 0)",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    kinds = args.kinds.split(",")
    common = {"http": args.http, "sandbox_nice": args.sandbox_nice}
    server = RedisServer()
    server.start()
    raw: dict[str, Any] = {}
    try:
        if "one" in only:
            one = [
                scenario(
                    server,
                    kind=kind,
                    keys=1,
                    callers_per_key=8,
                    threads=8,
                    duration=args.duration,
                    max_wait=max_wait,
                    **common,
                )
                for kind, max_wait in [("paypoll", 1.0), ("paypoll", 10.0)]
                + [(k, 1.0) for k in kinds if k != "paypoll"]
            ]
            raw["one_key"] = one
            print("\n### One key, 32 callers in 4 processes\n")
            print(table(one, "limiter"))
        if "many" in only:
            many_runs: list[tuple[str, dict[str, Any]]] = [(k, common) for k in kinds]
            if not args.no_reference and "paypoll" in kinds:
                many_runs += [
                    ("paypoll", {**common, "http": "requests"}),
                    ("paypoll", {**common, "sandbox_nice": 0}),
                ]
            many = [
                scenario(
                    server,
                    kind=kind,
                    keys=100,
                    callers_per_key=1,
                    threads=args.many_threads,
                    processes=args.many_processes,
                    duration=args.many_duration,
                    **options,
                )
                for kind, options in many_runs
            ]
            raw["hundred_keys"] = many
            print(
                f"\n### 100 keys at once, {args.many_processes} processes x {args.many_threads}"
                " threads (one caller per key in each process)\n"
            )
            print(table(many, "limiter"))
        if "margins" in only:
            sweep = [
                scenario(
                    server,
                    kind="paypoll",
                    keys=1,
                    callers_per_key=8,
                    threads=8,
                    duration=args.duration,
                    margin=float(m),
                    max_wait=10.0,
                    **common,
                )
                for m in args.margins.split(",")
            ]
            raw["margins"] = sweep
            print("\n### paypoll's margin, one key, 32 callers in 4 processes (max_wait 10 s)\n")
            print(table(sweep, "margin"))
        if "switch" in only:
            switch = [
                scenario(
                    server,
                    kind="paypoll",
                    keys=keys,
                    callers_per_key=cpk,
                    threads=threads,
                    duration=args.duration,
                    max_wait=1.0,
                    switch_interval=args.switch_interval,
                    **common,
                )
                for keys, cpk, threads in ((1, 8, 8), (100, 1, args.many_threads))
            ]
            raw["switch_interval"] = switch
            print(
                f"\n### paypoll with sys.setswitchinterval({args.switch_interval:g}) in the worker"
                " processes (1 key x 32 callers; 100 keys)\n"
            )
            print(table(switch, "limiter"))
        if "capacity" in only:
            caps = {
                f"{p} processes, pipeline {n}": capacity(
                    server, processes=p, pipeline=n, duration=args.capacity_seconds
                )
                for p, n in ((1, 0), (2, 0), (3, 0), (1, 100), (2, 100), (4, 100))
            }
            raw["capacity"] = caps
            print("\n### Reservations per second over 1,000 keys (every one booked)\n")
            print("| clients | reservations/s |\n|---|---|")
            for name, value in caps.items():
                print(f"| {name} | {value:,.0f} |")
    finally:
        server.cleanup()
    print("\n```json\n" + json.dumps(raw, indent=1) + "\n```")


if __name__ == "__main__":
    main()
