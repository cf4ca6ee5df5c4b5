"""Polling efficiency at a fixed request budget: the default backoff schedule against a
fixed-interval poller spending the same number of polls, on the same drawn payment lifecycle.

Two real runs, at the same time, each on its own sandbox started with the same seed (so the
N payments created get the same multiset of drawn lifecycles: outcome and time to outcome
depend only on the seed and the creation index):

1. the pipeline: N payments submitted through the producer, created and tracked by
   `paypoll worker` with the default PollSchedule (first 2 s, factor 1.6, cap 20 s, full jitter,
   floor 0.5 s), sweeper every 0.25 s, limiter at 5/s per key;
2. the baseline: a fixed-interval poller in this script (no jitter) that creates the same
   number of payments at the same pace (5/s per key) and polls each at created + k * I until
   terminal. I is chosen so that, on the drawn lifecycle, it spends the same number of polls as
   the default schedule does in expectation (simulation, 200 jitter draws).

Per payment, the sandbox's stats give the polls and the delay between the payment turning
terminal (terminal_at) and a client first seeing it (first_seen_terminal_at). In addition,
a simulation on the pure schedule functions against the same lifecycle (no sweeper, limiter or
HTTP delays) gives the same figures for: default schedule, fixed interval without jitter, and
fixed ceiling with full jitter (PollSchedule(factor=1), i.e. what the pipeline would do if
configured with first_delay = max_delay).

    .venv/bin/python benchmarks/polling.py            # 300 payments, pay after 1..120 s, ~4 min
    .venv/bin/python benchmarks/polling.py --quick    # 100 payments, pay after 1..30 s, ~1.5 min
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

from common import (
    FleetProcess,
    SandboxConnection,
    machine,
    make_accounts,
    percentile,
    settings_for,
    stack,
    write_section,
)

from worker.sandbox.config import OUTCOME_WEIGHTS
from worker.sandbox.lifecycle import LifecycleSettings, draw_plan
from worker.schedule import PollSchedule

TERMINAL = {"paid", "expired", "cancelled"}
RATE = 5.0


# --- the lifecycle and the simulation ----------------------------------------------------------
def drawn_offsets(
    n: int, *, seed: int, pay_after: tuple[float, float], stay: float, expire_after: float
) -> list[float]:
    """Seconds from creation to terminal of the first ``n`` payments a fresh sandbox with
    these options creates (the sandbox's own draw_plan, generation 0)."""
    settings = LifecycleSettings(
        pay_after=pay_after,
        outcomes=dict(OUTCOME_WEIGHTS),
        stay_pending=stay,
        expire_after=expire_after,
        unknown_status=0.0,
        unknown_status_name="processing",
    )
    return [
        draw_plan(settings, seed=seed, generation=0, index=i, created_at=0.0).terminal_at
        for i in range(n)
    ]


def sim_schedule(offset: float, schedule: PollSchedule, rng: random.Random) -> tuple[int, float]:
    """(polls, detection delay) of one payment terminal ``offset`` s after creation, polled as
    worker/steps.py does: first poll first_delay after create, then after the k-th poll wait
    schedule.delay(k, rng)."""
    t, polls = schedule.first_delay, 0
    while True:
        polls += 1
        if t >= offset:
            return polls, t - offset
        t += schedule.delay(polls, rng)


def sim_fixed(offset: float, interval: float) -> tuple[int, float]:
    """(polls, detection delay) of a poller at created + k * interval, k = 1, 2, ..."""
    k = max(1, math.ceil(offset / interval))
    return k, k * interval - offset


def fixed_interval_for(offsets: list[float], budget: float) -> float:
    """The smallest interval whose fixed poller spends at most ``budget`` polls in total."""
    low, high = 0.01, max(offsets) + 1
    for _ in range(60):
        mid = (low + high) / 2
        if sum(sim_fixed(o, mid)[0] for o in offsets) > budget:
            low = mid
        else:
            high = mid
    return high


def jitter_ceiling_for(offsets: list[float], budget: float, runs: int) -> float:
    """The ceiling J of PollSchedule(first_delay=J, factor=1, max_delay=J) spending ``budget``."""
    low, high = 0.5, 4 * max(offsets) + 1
    for _ in range(30):
        mid = (low + high) / 2
        total = simulate(offsets, PollSchedule(first_delay=mid, factor=1.0, max_delay=mid), runs)
        if total.polls_per_payment * len(offsets) > budget:
            low = mid
        else:
            high = mid
    return high


DEFAULT = PollSchedule()  # the schedule as shipped (worker/defaults.py)
DEFAULT_LABEL = (
    f"default ({DEFAULT.first_delay:g} s x{DEFAULT.factor:g}, cap {DEFAULT.max_delay:g} s, "
    "full jitter)"
)


@dataclass
class Figures:
    """Polls and detection delays of a set of payments."""

    polls: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)

    @property
    def polls_per_payment(self) -> float:
        return statistics.fmean(self.polls) if self.polls else math.nan

    def row(self, name: str, how: str) -> str:
        return (
            f"| {name} | {how} | {self.polls_per_payment:.2f} | {sum(self.polls)} | "
            f"{percentile(self.delays, 50):.1f} s | {percentile(self.delays, 95):.1f} s | "
            f"{max(self.delays):.1f} s |"
        )


def simulate(offsets: list[float], schedule: PollSchedule, runs: int, seed: int = 1) -> Figures:
    """The schedule on the lifecycle, ``runs`` times with fresh jitter; totals are per run."""
    rng = random.Random(seed)
    out = Figures()
    for _ in range(runs):
        for offset in offsets:
            polls, delay = sim_schedule(offset, schedule, rng)
            out.polls.append(polls)
            out.delays.append(delay)
    # Keep polls summed per run comparable with one real run: scale the list down.
    out.polls = [round(sum(out.polls[i :: len(offsets)]) / runs) for i in range(len(offsets))]
    return out


# --- the real runs -----------------------------------------------------------------------------
def figures_from_stats(stats: dict) -> tuple[Figures, list[dict]]:
    """Polls and detection delays of every terminal payment the sandbox knows."""
    out = Figures()
    rows = []
    for payment in stats["payments"].values():
        rows.append(payment)
        if payment["terminal_at"] is None or payment["first_seen_terminal_at"] is None:
            continue
        out.polls.append(payment["polls"])
        out.delays.append(payment["first_seen_terminal_at"] - payment["terminal_at"])
    return out, rows


def run_pipeline(args: argparse.Namespace, sandbox_kwargs: dict, result: dict) -> None:
    from worker.producer import Producer
    from worker.store import PaymentSpec

    accounts = make_accounts(args.accounts)
    with stack(accounts, account_rate=RATE, rate=RATE, **sandbox_kwargs) as st:
        producer = Producer.from_settings(settings_for(st))
        specs = [
            PaymentSpec(
                accounts[i % args.accounts].name,
                f"poll-{i}",
                "10",
                "USD",
                "https://shop.example/thanks",
            )
            for i in range(args.payments)
        ]
        assert all(r is True for r in producer.submit_specs(specs))
        fleet = FleetProcess(st, processes=args.processes, threads=args.threads)
        try:
            fleet.wait_workers()
            deadline = time.monotonic() + args.timeout
            while True:
                counts = producer.counts()
                if sum(counts[s] for s in TERMINAL) >= args.payments:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pipeline run not finished: {counts}")
                time.sleep(1)
        finally:
            fleet.stop()
        stats = st.sandbox.stats()
        result["stats"] = stats
        result["counts"] = producer.counts()


def run_fixed(
    args: argparse.Namespace, sandbox_kwargs: dict, interval: float, result: dict
) -> None:
    accounts = make_accounts(args.accounts)
    with stack(accounts, account_rate=RATE, rate=RATE, **sandbox_kwargs) as st:
        limited = [0]

        def one_account(index: int) -> None:
            a = accounts[index]
            conn = SandboxConnection(st.sandbox.url, a.client_id, a.secret)
            mine = range(index, args.payments, args.accounts)
            heap: list[tuple[float, str]] = []
            for n, i in enumerate(mine):
                # Same pace as the pipeline's creates (5/s per key), so polls spread the same.
                time.sleep(max(0.0, created0 + n * 0.21 - time.time()))
                created = conn.create(f"poll-{i}")
                heapq.heappush(heap, (time.time() + interval, created["id"]))
            while heap:
                due, pid = heapq.heappop(heap)
                time.sleep(max(0.0, due - time.time()))
                status, body = conn.call("GET", f"{conn.path}/{pid}", None, conn.headers)
                if status == 429:
                    limited[0] += 1
                    heapq.heappush(heap, (time.time() + 1.0, pid))
                elif status != 200:
                    raise RuntimeError(f"GET {pid}: {status}")
                elif body["status"] not in TERMINAL:
                    # Fixed grid from creation: created + k * interval (no drift).
                    heapq.heappush(heap, (due + interval, pid))
            conn.close()

        created0 = time.time() + 0.5
        threads = [threading.Thread(target=one_account, args=(i,)) for i in range(args.accounts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["stats"] = st.sandbox.stats()
        result["rate_limited"] = limited[0]


def buckets(rows: list[dict], edges: list[float]) -> dict[str, list[float]]:
    """Detection delays grouped by the payment's time to terminal (from creation)."""
    out: dict[str, list[float]] = {}
    for p in rows:
        if p["terminal_at"] is None or p["first_seen_terminal_at"] is None:
            continue
        offset = p["planned_terminal_at"] - p["created_at"]
        for low, high in itertools.pairwise(edges):
            if low <= offset < high:
                out.setdefault(f"{low:g}-{high:g} s", []).append(
                    p["first_seen_terminal_at"] - p["terminal_at"]
                )
                break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=300)
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--pay-after", default="1:120", help="MIN:MAX seconds (sandbox option)")
    parser.add_argument("--stay-pending", type=float, default=0.1)
    parser.add_argument("--expire-after", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--sim-runs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.payments, args.pay_after, args.expire_after = 100, "1:30", 45.0
    start_machine = machine()
    print(start_machine)
    low, high = (float(x) for x in args.pay_after.split(":"))
    offsets = drawn_offsets(
        args.payments,
        seed=args.seed,
        pay_after=(low, high),
        stay=args.stay_pending,
        expire_after=args.expire_after,
    )
    default = PollSchedule()
    sim_default = simulate(offsets, default, args.sim_runs)
    budget = sum(sim_default.polls)
    interval = fixed_interval_for(offsets, budget)
    sim_fixed_fig = Figures()
    for o in offsets:
        polls, delay = sim_fixed(o, interval)
        sim_fixed_fig.polls.append(polls)
        sim_fixed_fig.delays.append(delay)
    ceiling = jitter_ceiling_for(offsets, budget, max(20, args.sim_runs // 5))
    sim_jitter = simulate(
        offsets, PollSchedule(first_delay=ceiling, factor=1.0, max_delay=ceiling), args.sim_runs
    )
    print(
        f"expected budget of the default schedule: {budget} polls; fixed interval "
        f"{interval:.2f} s; full-jitter ceiling {ceiling:.2f} s",
        flush=True,
    )

    sandbox_kwargs = {
        "pay_after": args.pay_after,
        "stay_pending": args.stay_pending,
        "expire_after": args.expire_after,
        "seed": args.seed,
    }
    pipe_result: dict = {}
    fixed_result: dict = {}
    started = time.monotonic()
    errors: list[BaseException] = []

    def guarded(target, *a):  # type: ignore[no-untyped-def]
        try:
            target(*a)
        except BaseException as exc:  # reported below
            errors.append(exc)

    runs = [
        threading.Thread(target=guarded, args=(run_pipeline, args, sandbox_kwargs, pipe_result)),
        threading.Thread(
            target=guarded, args=(run_fixed, args, sandbox_kwargs, interval, fixed_result)
        ),
    ]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    if errors:
        raise errors[0]
    wall = time.monotonic() - started
    real_budget = sum(
        p["polls"] for p in pipe_result["stats"]["payments"].values() if p["terminal_at"]
    )
    real_interval = fixed_interval_for(offsets, real_budget)
    real_budget_fixed = Figures()
    for o in offsets:
        polls, delay = sim_fixed(o, real_interval)
        real_budget_fixed.polls.append(polls)
        real_budget_fixed.delays.append(delay)
    # Other caps of the same backoff, for the lead: what lowering POLL_MAX_DELAY buys and costs.
    alternatives = [
        (cap, simulate(offsets, PollSchedule(max_delay=cap), args.sim_runs)) for cap in (10, 20)
    ]
    real_default, default_rows = figures_from_stats(pipe_result["stats"])
    real_fixed, fixed_rows = figures_from_stats(fixed_result["stats"])
    for name, rows in (("pipeline", default_rows), ("fixed", fixed_rows)):
        got = sorted(round(p["planned_terminal_at"] - p["created_at"], 3) for p in rows)
        if got != sorted(round(o, 3) for o in offsets):
            print(f"WARNING: the {name} run's lifecycle differs from the drawn one", flush=True)
    pipe_clients = pipe_result["stats"]["clients"]
    limited_pipe = sum(c["rate_limited"] for c in pipe_clients.values())
    max_1s = max(c["max_accepted_in_1s"] for c in pipe_clients.values())

    edges = [0, 10, 30, 60, high + 1, args.expire_after + 1]
    b_default, b_fixed = buckets(default_rows, edges), buckets(fixed_rows, edges)
    scale_note = (
        ""
        if (low, high, args.expire_after) == (1, 120, 180)
        else (" (shortened lifecycle; the schedule itself is not scaled)")
    )
    lines = [
        "### Polling efficiency at a fixed request budget",
        "",
        f"What: `.venv/bin/python benchmarks/polling.py{''.join(' ' + a for a in sys.argv[1:])}`. "
        f"{args.payments} payments on {args.accounts} accounts; sandbox lifecycle "
        f"`--pay-after {args.pay_after} --stay-pending {args.stay_pending:g} "
        f"--expire-after {args.expire_after:g} --seed {args.seed}`{scale_note}: outcome paid "
        f"80% / expired 10% / cancelled 10% after 1..{high:g} s, and {args.stay_pending:.0%} "
        f"stay pending until they expire at {args.expire_after:g} s. Real time, not scaled: the "
        f"default PollSchedule as shipped (first {DEFAULT.first_delay:g} s, factor {DEFAULT.factor:g}, cap {DEFAULT.max_delay:g} s, full jitter, floor "
        "0.5 s). Two real runs side by side, each on its own sandbox with the same seed (same "
        f"drawn lifecycles): the pipeline (`paypoll worker --processes {args.processes} "
        f"--threads {args.threads}`, sweeper every 0.25 s, limiter 5/s per key), and a "
        "fixed-interval poller written in the script (polls each payment at created + k x I, no "
        "jitter, creates at the same 5/s per key pace). I is the interval that spends the same "
        f"number of polls as the default schedule's expected budget on this lifecycle ({budget} "
        f"polls, from {args.sim_runs} simulated jitter draws): I = {interval:.2f} s. The "
        "simulation rows apply the pure schedule functions to the same lifecycle (no sweeper, "
        "limiter or HTTP delay). Detection delay = sandbox first_seen_terminal_at - terminal_at.",
        "",
        f"Machine: {start_machine}. Wall time of the real runs: {wall:.0f} s.",
        "",
        "| schedule | run | polls per payment | polls in total | detection p50 | p95 | max |",
        "|---|---|---|---|---|---|---|",
        real_default.row(DEFAULT_LABEL, "real: pipeline"),
        real_fixed.row(f"fixed interval {interval:.2f} s", "real: script poller"),
        sim_default.row(DEFAULT_LABEL, f"simulated, mean of {args.sim_runs}"),
        sim_fixed_fig.row(f"fixed interval {interval:.2f} s, no jitter", "simulated"),
        sim_jitter.row(
            f"fixed ceiling {ceiling:.2f} s, full jitter (factor 1)",
            f"simulated, mean of {args.sim_runs}",
        ),
        real_budget_fixed.row(
            f"fixed interval {real_interval:.2f} s, no jitter",
            f"simulated, budget = the pipeline's real {sum(real_default.polls)} polls",
        ),
        *(
            fig.row(
                f"backoff 2 s x1.6, cap {cap:g} s, full jitter",
                f"simulated, mean of {args.sim_runs}",
            )
            for cap, fig in alternatives
        ),
        "",
        "Detection delay (p50 / p95) by the payment's time to terminal, real runs:",
        "",
        "| time to terminal | payments | default schedule | fixed interval |",
        "|---|---|---|---|",
    ]
    for key in sorted(b_default, key=lambda k: float(k.split("-")[0])):
        d, f = b_default[key], b_fixed.get(key, [])
        lines.append(
            f"| {key} | {len(d)} | {percentile(d, 50):.1f} s / {percentile(d, 95):.1f} s | "
            f"{percentile(f, 50):.1f} s / {percentile(f, 95):.1f} s |"
        )
    lines += [
        "",
        f"Pipeline run: final states {dict((k, v) for k, v in pipe_result['counts'].items() if v)}; "
        f"429s {limited_pipe}; largest number of accepted calls of one key in 1 s: {max_1s}. "
        f"Fixed poller: 429s {fixed_result['rate_limited']}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_section("polling", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
