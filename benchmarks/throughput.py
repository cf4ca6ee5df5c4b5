"""Fleet throughput: how much of 100 accounts' 500 requests/s the worker fleet achieves here.

For each --processes x --threads configuration, on a fresh private Redis and sandbox (100
clients, the sandbox's own strict sliding limit of 5/s per key, payments that stay pending):
submits payments through the producer, starts `paypoll worker`, lets the creates finish, then
measures for --duration seconds: API calls the SANDBOX answered per second (share of 500), 429s,
the largest count of accepted calls of one key in any 1-second window, and the CPU (utime+stime
from /proc) of the fleet's worker processes per API call. The poll schedule is shortened
(first 0.5 s, factor 1, max 1 s) so every account always has polls due: the limiter, not the
schedule, decides the rate. With --profile, py-spy samples one worker process during the window.

    .venv/bin/python benchmarks/throughput.py --configs 2x32,3x32,2x64 --duration 30
    .venv/bin/python benchmarks/throughput.py --quick
    .venv/bin/python benchmarks/throughput.py --configs 2x32 --profile 2x32 --write-docs
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PYTHON,
    FleetProcess,
    cpu_seconds,
    machine,
    make_accounts,
    sandbox_totals,
    scrape,
    settings_for,
    stack,
    stolen_seconds,
    write_section,
)

RATE = 5.0


@dataclass
class Result:
    config: str
    seconds: float
    calls: int
    per_second: float
    share: float
    rate_limited: int
    max_in_1s: int
    worker_cpu: float
    cpu_ms_per_call: float
    sandbox_cpu: float
    redis_cpu: float
    stolen: float  # CPU seconds the host's other guests took from this machine's vCPUs
    late_sends: int  # calls written too late after their slot check: their keys fenced
    by_route: dict[str, int]
    jobs: dict[str, float]
    limiter_wait: float  # mean seconds a granted call slept for its slot
    call_seconds: float  # mean seconds of an API call (HTTP only)
    profile: list[tuple[str, float, float]] | None = None
    profile_self: list[tuple[str, float]] | None = None


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not installed: no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--gil",  # only the thread holding the GIL: Python CPU, not threads blocked on I/O
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _top_costs(path: Path, top: int = 30) -> list[tuple[str, float, float]]:
    """(function, % of busy samples inside it incl. callees, % self) from py-spy raw output,
    per function (line numbers dropped); frames waiting on a socket, lock or sleep dropped."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    busy = 0
    idle_markers = (
        "wait (threading.py",
        "select (selectors.py",
        "sleep",
        "_wait_for_tstate_lock",
        "readinto (socket.py",
        "get (queue.py",
        "poll (selectors.py",
    )
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if any(marker in frames[-1] for marker in idle_markers):
            continue
        n = int(count)
        busy += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            inclusive[frame] += n
    if not busy:
        return []
    return [(f, 100 * c / busy, 100 * own.get(f, 0) / busy) for f, c in inclusive.most_common(top)]


def _top_self(path: Path, top: int = 10) -> list[tuple[str, float]]:
    """The functions with the most busy samples of their own."""
    own: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = re.sub(r":\d+\)$", ")", stack.split(";")[-1])
        own[leaf] += int(count)
        busy += int(count)
    return [(f, 100 * c / busy) for f, c in own.most_common(top)] if busy else []


LATE_SENDS = "paypoll_limiter_late_sends_total"


def _mean(m0: dict[str, float], m1: dict[str, float], histogram: str) -> float:
    """Mean of a Prometheus histogram between two scrapes (NaN when nothing was observed)."""
    count = m1.get(f"{histogram}_count", 0.0) - m0.get(f"{histogram}_count", 0.0)
    total = m1.get(f"{histogram}_sum", 0.0) - m0.get(f"{histogram}_sum", 0.0)
    return total / count if count else float("nan")


def run_config(
    processes: int,
    threads: int,
    *,
    accounts: int,
    per_account: int,
    duration: float,
    profile: bool,
    extra_env: dict[str, str] | None = None,
) -> Result:
    from worker.producer import Producer
    from worker.store import PaymentSpec

    accs = make_accounts(accounts)
    env = {
        # The old schedule, shortened: every account always has polls due, so the limiter (not
        # the poll planner's 0.9 share of each key) is what bounds the calls.
        "PAYPOLL_POLL_POLICY": "backoff",
        "PAYPOLL_POLL_FIRST_DELAY": "0.5",
        "PAYPOLL_POLL_FACTOR": "1",
        "PAYPOLL_POLL_MAX_DELAY": "1",
        **(extra_env or {}),
    }
    with stack(accs, account_rate=RATE, env=env, rate=RATE, pay_after="3600:7200", seed=1) as st:
        producer = Producer.from_settings(settings_for(st))
        specs = [
            PaymentSpec(a.name, f"tp-{a.name}-{i}", "10", "USD", "https://shop.example/thanks")
            for i in range(per_account)
            for a in accs
        ]
        assert all(r is True for r in producer.submit_specs(specs))
        fleet = FleetProcess(st, processes=processes, threads=threads, metrics=True)
        try:
            pids = fleet.wait_workers()
            # Warm-up: every create made (then only polls remain), plus a few seconds.
            deadline = time.monotonic() + 120
            while producer.counts()["pending"] < len(specs):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"creates not done: {producer.counts()}")
                time.sleep(0.5)
            time.sleep(3)
            spy = None
            spy_out = st.workdir / "profile.txt"
            if profile:
                spy = _profile(pids[0], duration, spy_out)
            m0 = scrape(fleet.metrics_url)
            s0 = sandbox_totals(st.sandbox.stats(payments=False))
            c0 = cpu_seconds(pids)
            sb0 = cpu_seconds([st.sandbox.process.pid])
            r0 = cpu_seconds([st.redis.process.pid])  # type: ignore[union-attr]
            st0 = stolen_seconds()
            t0 = time.monotonic()
            time.sleep(duration)
            s1 = sandbox_totals(st.sandbox.stats(payments=False))
            m1 = scrape(fleet.metrics_url)
            c1 = cpu_seconds(pids)
            sb1 = cpu_seconds([st.sandbox.process.pid])
            r1 = cpu_seconds([st.redis.process.pid])  # type: ignore[union-attr]
            st1 = stolen_seconds()
            elapsed = time.monotonic() - t0
            if spy is not None:
                spy.wait(240)
            alive = fleet.worker_pids()
            if sorted(alive) != sorted(pids):
                raise RuntimeError(f"worker processes changed during the run: {pids} -> {alive}")
        finally:
            fleet.stop()
        calls = s1[0] - s0[0]
        by_route = {k: s1[3].get(k, 0) - s0[3].get(k, 0) for k in s1[3]}
        result = Result(
            config=f"{processes}x{threads}",
            seconds=elapsed,
            calls=calls,
            per_second=calls / elapsed,
            share=calls / elapsed / (RATE * accounts),
            rate_limited=s1[1] - s0[1],
            max_in_1s=s1[2],
            worker_cpu=c1 - c0,
            cpu_ms_per_call=1000 * (c1 - c0) / max(calls, 1),
            sandbox_cpu=sb1 - sb0,
            redis_cpu=r1 - r0,
            stolen=st1 - st0,
            late_sends=round(m1.get(LATE_SENDS, 0.0) - m0.get(LATE_SENDS, 0.0)),
            by_route={k: v for k, v in by_route.items() if v},
            limiter_wait=_mean(m0, m1, "paypoll_limiter_wait_seconds"),
            call_seconds=_mean(m0, m1, "paypoll_api_call_seconds"),
            jobs={
                k.split("=", 1)[1].rstrip("}"): m1[k] - m0.get(k, 0.0)
                for k in m1
                if k.startswith("paypoll_jobs_total{") and m1[k] - m0.get(k, 0.0)
            },
        )
        if profile and spy_out.exists():
            result.profile = _top_costs(spy_out)
            result.profile_self = _top_self(spy_out)
        return result


def render(results: list[Result], args: argparse.Namespace, start_machine: str) -> str:
    best = max(results, key=lambda r: r.per_second)
    lines = [
        "### Fleet throughput (100 accounts, 500 requests/s allowed)",
        "",
        f"What: `{' '.join(['.venv/bin/python', 'benchmarks/throughput.py', *sys.argv[1:]])}`. "
        f"{args.accounts} accounts at 5 req/s each against the sandbox's strict sliding limit "
        f"(5 per key in any 1 s window), {args.per_account} payments per account submitted "
        "through the producer (creates, then polls; the schedule is shortened to first 0.5 s, "
        "factor 1, max 1 s so polls are always due). After all creates were made, API calls "
        f"answered by the sandbox were counted for {args.duration:g} s; CPU is utime+stime of the "
        "fleet's worker processes (/proc/PID/stat) over the same window; stolen is the CPU the "
        "hypervisor gave other guests meanwhile (/proc/stat steal: this VM's noise). Logs at INFO (one JSON "
        "`api.request` line per call, as in production) to a file.",
        "",
        f"Machine: {start_machine}. Sandbox, Redis, the fleet and this script share the 2 cores.",
        "",
        "| processes x threads | API calls/s | share of 500 | 429s | late writes fenced "
        "| max accepted per key in 1 s "
        "| jobs by outcome | mean limiter wait | mean HTTP call | worker CPU per call | worker CPU (cores) | sandbox CPU (cores) "
        "| Redis CPU (cores) | stolen by the host (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        jobs = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.jobs.items()))
        lines.append(
            f"| {r.config} | {r.per_second:.0f} | {100 * r.share:.0f}% | {r.rate_limited} | "
            f"{r.late_sends} | "
            f"{r.max_in_1s} | {jobs} | {1000 * r.limiter_wait:.0f} ms | "
            f"{1000 * r.call_seconds:.1f} ms | "
            f"{r.cpu_ms_per_call:.2f} ms | {r.worker_cpu / r.seconds:.2f} | "
            f"{r.sandbox_cpu / r.seconds:.2f} | {r.redis_cpu / r.seconds:.2f} | "
            f"{r.stolen / r.seconds:.2f} |"
        )
    lines += [
        "",
        f"Best: {best.config}, {best.per_second:.0f} calls/s "
        f"({100 * best.share:.0f}% of 500). Calls by route in its window: "
        + ", ".join(f"{k} {v}" for k, v in sorted(best.by_route.items()))
        + ".",
    ]
    return "\n".join(lines)


def render_profile(results: list[Result], args: argparse.Namespace) -> str:
    lines: list[str] = []
    for r in results:
        if r.profile:
            lines += [
                "#### Where the worker's CPU goes",
                "",
                f"`.venv/bin/python benchmarks/throughput.py{''.join(' ' + a for a in sys.argv[1:])}`: "
                f"{r.per_second:.0f} calls/s, {r.cpu_ms_per_call:.2f} ms worker CPU per call. "
                f"py-spy profile of one worker process ({r.config}, 200 Hz, `--gil`: only the "
                "thread holding the GIL is sampled, i.e. Python CPU time), share of samples and "
                "the CPU per API call it stands for:",
                "",
                "| function (inclusive of callees) | share | CPU per API call |",
                "|---|---|---|",
            ]
            lines += [
                f"| `{f}` | {inc:.1f}% | {inc / 100 * r.cpu_ms_per_call:.2f} ms |"
                for f, inc, _own in r.profile
            ]
            lines += [
                "",
                "Top self time: "
                + "; ".join(f"`{f}` {share:.1f}%" for f, share in (r.profile_self or []))
                + ".",
            ]
    return "\n".join(lines)


def setting(text: str) -> tuple[str, str]:
    """One ``--env NAME=VALUE`` as (NAME, VALUE); argparse reports the error otherwise."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="2x32,3x32,2x64", help="PxT,PxT,...")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--per-account", type=int, default=20, help="payments per account")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument(
        "--profile", default="", metavar="PxT", help="py-spy one worker process of this config"
    )
    parser.add_argument(
        "--profile-only",
        action="store_true",
        help="with --write-docs, write only the profile section (keep the table)",
    )
    parser.add_argument(
        "--env",
        type=setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the fleet (repeatable), e.g. PAYPOLL_MAX_WAIT=0.5",
    )
    parser.add_argument("--quick", action="store_true", help="one config, 15 s")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.configs, args.duration = "2x32", 15.0
    start_machine = machine()
    print(start_machine)
    results = []
    for config in args.configs.split(","):
        p, t = (int(x) for x in config.split("x"))
        r = run_config(
            p,
            t,
            accounts=args.accounts,
            per_account=args.per_account,
            duration=args.duration,
            profile=args.profile == config,
            extra_env=dict(args.env),
        )
        print(
            f"{r.config}: {r.per_second:.0f} calls/s ({100 * r.share:.0f}% of 500), "
            f"429s {r.rate_limited}, late writes fenced {r.late_sends}, max/key/1s {r.max_in_1s}, jobs {r.jobs}, limiter wait {1000 * r.limiter_wait:.0f} ms, "
            f"call {1000 * r.call_seconds:.1f} ms, worker CPU "
            f"{r.cpu_ms_per_call:.2f} ms/call ({r.worker_cpu / r.seconds:.2f} cores), sandbox "
            f"{r.sandbox_cpu / r.seconds:.2f} cores, redis {r.redis_cpu / r.seconds:.2f} cores, "
            f"stolen {r.stolen / r.seconds:.2f} cores",
            flush=True,
        )
        results.append(r)
    text = render(results, args, start_machine)
    profile = render_profile(results, args)
    print(text + "\n\n" + profile)
    if args.write_docs and not args.profile_only:
        write_section("throughput", text)
    if args.write_docs and profile:
        write_section("throughput-profile", profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
