"""Poll policies side by side (issue 11): how soon each notices terminal states, on how many
polls, with how much of each key's budget, and fairness under saturation; zero 429s checked.

Every policy of a lifecycle runs at the same time, each with its own redis-server, sandbox
(same seed: the same drawn lifecycle) and `paypoll worker` fleet, configured only through
the environment:

- planner      PAYPOLL_POLL_POLICY=planner (the new default: share 0.9 of the rate, min gap 1 s)
- backoff      PAYPOLL_POLL_POLICY=backoff (the old default: 2 s x1.6, cap 20 s, full jitter)
- fixed        backoff with FIRST_DELAY = MAX_DELAY = I, FACTOR 1, JITTER 0, where I is tuned so
               the pipeline spends the old backoff's expected poll count on the drawn
               lifecycle (the issue's "fixed interval tuned to the same poll count": the old
               default's count, as in the issue's own figures; at the planner's count it would
               poll every ~1-2 s and the capped row would be the planner itself). Both counts
               from a keyed model of the pipeline (polling_model.sim_keyed); --fixed-interval
               overrides
- round_robin  PAYPOLL_POLL_POLICY=round_robin, PAYPOLL_POLL_SHARE=1.0 (flat hazard, whole budget)
- capped       planner with PAYPOLL_POLL_SHARE chosen so it spends the fixed row's poll count
               (modelled before the run, benchmarks/polling_model.py; --capped-share overrides)

Lifecycles: uniform (25 payments on 1 key, payers 5-120 s), long_tail (40 on 1 key: 60% pay
within a minute, 20% after 120-420 s, 20% never pay and expire at 450 s), saturation (50,000
pending on 10 keys, seeded with POST /_admin/seed and PaymentStore.register_tracking, then
measured for --window seconds; the sandbox's 5/s limit stays real throughout).

    .venv/bin/python benchmarks/polling.py --lifecycle uniform      # 3 min (measured)
    .venv/bin/python benchmarks/polling.py --lifecycle long_tail    # 8 min (measured)
    .venv/bin/python benchmarks/polling.py --lifecycle saturation   # ~44 min (--window 2500 +
                                                                    # setup; not yet run whole)
    .venv/bin/python benchmarks/polling.py --lifecycle all --write-docs     # the three, in turn
    .venv/bin/python benchmarks/polling.py --quick --lifecycle ...  # smoke: uniform 1 min,
                                  # long_tail 3.5 min, saturation 1,000 on 2 keys 300 s: 5 min

--save FILE keeps every run's raw sandbox stats (JSON). On the code before the planner, the
backoff pipeline stalls under saturation above ~100 pending per key (the benchmark shows it as
"never polled" and polls/s near 0).

Until the planner is merged (worker.settings has no poll_policy), its rows run as backoff and
are labelled so; --write-docs then refuses to write.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests
from common import FleetProcess, cpu_seconds, machine, make_accounts, settings_for, stack
from common import write_section as write_docs_section
from polling_model import (
    LIGHT,
    LIGHT_QUICK,
    RATE,
    SATURATION,
    SATURATION_QUICK,
    Lifecycle,
    Saturation,
    backoff_polls,
    fixed_interval_for,
    fixed_polls,
    planner_polls,
    share_for,
)
from polling_report import (
    RunResult,
    floor_rows,
    floors_table,
    light_table,
    saturation_table,
)
from scale import register_all

POLICIES = ("planner", "backoff", "fixed", "round_robin", "capped")
SATURATION_POLICIES = ("planner", "backoff", "round_robin")  # fixed there is backoff's FIFO
DEFAULT_SHARE = 0.9  # PAYPOLL_POLL_SHARE's default (issue 11 interface)
TERMINAL = ("paid", "expired", "cancelled")


INTRO = """### Poll policies side by side (issue 11)

`benchmarks/polling.py` runs each poll policy at the same time on its own redis-server, sandbox
(same seed, so the same drawn lifecycle) and `paypoll worker` fleet, configured only by the
environment: **planner** (`PAYPOLL_POLL_POLICY=planner`, the default), **backoff** (the old
default: 2 s x1.6, cap 20 s, full jitter), **fixed** (backoff with first = max delay = I, factor
1, no jitter; I tuned so the pipeline spends the old backoff's expected poll count),
**round_robin** (flat hazard, `PAYPOLL_POLL_SHARE=1.0`) and **capped** (the planner with the
share at which it spends the fixed row's poll count). Lifecycles: uniform (payers 5-120 s),
long tail (most within a minute, some after minutes, a fifth expire unpaid), saturation
(50,000 pending on 10 keys). Detection delay is measured by the sandbox:
first_seen_terminal_at - terminal_at. Each lifecycle's section below is written by
`benchmarks/polling.py --lifecycle NAME --write-docs`, with its floors."""


def planner_merged() -> bool:
    """Whether this code reads PAYPOLL_POLL_POLICY (before the planner, it is ignored)."""
    from worker.settings import Settings

    return "poll_policy" in {f.name for f in dataclasses.fields(Settings)}


def planner_default_share() -> float:
    from worker import defaults

    return float(getattr(defaults, "POLL_SHARE", DEFAULT_SHARE))


@dataclasses.dataclass(frozen=True)
class Policy:
    """One row: its environment and the poll budget per key it may spend."""

    name: str
    env: dict[str, str]
    share: float  # of the key's rate the policy's polls may use (1 for backoff/fixed)
    how: str

    def label(self, merged: bool) -> str:
        planner_family = self.name in ("planner", "round_robin", "capped")
        suffix = "" if merged or not planner_family else " **[PRE-MERGE: ran as backoff]**"
        return f"{self.name}: {self.how}{suffix}"


def policies(names: list[str], *, interval: float, capped_share: float) -> list[Policy]:
    """The policies asked for, with the tuned fixed interval and capped share."""
    share = planner_default_share()
    table = {
        "planner": Policy("planner", {"PAYPOLL_POLL_POLICY": "planner"}, share, f"share {share:g}"),
        "backoff": Policy(
            "backoff", {"PAYPOLL_POLL_POLICY": "backoff"}, 1.0, "2 s x1.6, cap 20 s, full jitter"
        ),
        "fixed": Policy(
            "fixed",
            {
                "PAYPOLL_POLL_POLICY": "backoff",
                "PAYPOLL_POLL_FIRST_DELAY": f"{interval:.3f}",
                "PAYPOLL_POLL_MAX_DELAY": f"{interval:.3f}",
                "PAYPOLL_POLL_FACTOR": "1",
                "PAYPOLL_POLL_JITTER": "0",
            },
            1.0,
            f"every {interval:.2f} s",
        ),
        "round_robin": Policy(
            "round_robin",
            {"PAYPOLL_POLL_POLICY": "round_robin", "PAYPOLL_POLL_SHARE": "1.0"},
            1.0,
            "flat hazard, share 1.0",
        ),
        "capped": Policy(
            "capped",
            {"PAYPOLL_POLL_POLICY": "planner", "PAYPOLL_POLL_SHARE": f"{capped_share:.4f}"},
            capped_share,
            f"planner at share {capped_share:.3f}",
        ),
    }
    return [table[n] for n in names]


SAVED: dict[str, list[dict[str, Any]]] = {}  # lifecycle -> its runs' raw results (--save)


def concurrently(jobs: list[Callable[[], None]]) -> None:
    """Run every job in its own thread; re-raise the first failure once all have ended."""
    errors: list[BaseException] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # reported below, after the others end
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def full_stats(url: str, *, times: bool) -> dict[str, Any]:
    """The sandbox's stats with every payment (50,000 take a while: a long timeout)."""
    response = requests.get(f"{url}/_admin/stats?times={int(times)}", timeout=300)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


# --- light load --------------------------------------------------------------------------------
def run_light(
    lifecycle: Lifecycle, policy: Policy, result: RunResult, *, processes: int, threads: int
) -> None:
    """Submit the lifecycle's payments, run a fleet until all are final, keep the stats."""
    from worker.producer import Producer
    from worker.store import PaymentSpec

    accounts = make_accounts(lifecycle.keys)
    started = time.monotonic()
    timeout = lifecycle.expire_after + lifecycle.pay_after[1] + lifecycle.tail[2] + 300
    with stack(
        accounts, account_rate=RATE, rate=RATE, env=policy.env, **lifecycle.sandbox_kwargs()
    ) as st:
        producer = Producer.from_settings(settings_for(st))
        specs = [
            PaymentSpec(
                accounts[i % lifecycle.keys].name,
                f"poll-{i}",
                "10",
                "USD",
                "https://shop.example/thanks",
            )
            for i in range(lifecycle.payments)
        ]
        assert all(r is True for r in producer.submit_specs(specs))
        result.launched_at = time.time()
        fleet = FleetProcess(st, processes=processes, threads=threads)
        try:
            pids = fleet.wait_workers()
            deadline = time.monotonic() + timeout
            while sum(producer.counts()[s] for s in TERMINAL) < lifecycle.payments:
                if time.monotonic() > deadline or fleet.process.poll() is not None:
                    raise RuntimeError(
                        f"{policy.name} on {lifecycle.name} not finished: {producer.counts()}; "
                        f"fleet log: {fleet.log_path.read_text(errors='replace')[-1500:]}"
                    )
                time.sleep(0.5)
            result.worker_cpu = cpu_seconds(pids)
        finally:
            fleet.stop()
        result.stats = full_stats(st.sandbox.url, times=False)
        result.counts = {k: v for k, v in producer.counts().items() if v}
    result.wall = time.monotonic() - started


def light(args: argparse.Namespace, name: str, merged: bool) -> tuple[list[str], list]:
    """Run every asked policy on one light lifecycle, side by side; its section and floors."""
    lifecycle = (LIGHT_QUICK if args.quick else LIGHT)[name]
    offsets = lifecycle.offsets()
    keys = lifecycle.keys
    backoff_budget = backoff_polls(offsets, keys=keys)
    interval = args.fixed_interval or fixed_interval_for(offsets, backoff_budget, keys=keys)
    fixed_budget = fixed_polls(offsets, interval, keys=keys)
    capped = args.capped_share or share_for(offsets, fixed_budget, keys=lifecycle.keys)
    chosen = policies(args.policies or list(POLICIES), interval=interval, capped_share=capped)
    results = [RunResult(p.name, p.label(merged), p.share * RATE) for p in chosen]
    print(
        f"{name}: {lifecycle.payments} payments, {lifecycle.describe()}; backoff expects "
        f"{backoff_budget:.0f} polls -> fixed every {interval:.2f} s ({fixed_budget} polls) -> "
        f"capped share {capped:.3f} (model: "
        f"{planner_polls(offsets, capped, keys=lifecycle.keys):.0f} polls)",
        flush=True,
    )
    started = time.monotonic()
    concurrently(
        [
            (
                lambda p=p, r=r: run_light(
                    lifecycle, p, r, processes=args.processes or 1, threads=args.threads or 8
                )
            )
            for p, r in zip(chosen, results, strict=True)
        ]
    )
    wall = time.monotonic() - started
    SAVED[name] = [dataclasses.asdict(r) for r in results]
    rows, figures = light_table(results, lifecycle)
    floors = floor_rows(name, figures, premerge=not merged)
    if "capped" in figures and "fixed" in figures and figures["capped"]["polls"]:
        # The planner spends about share x rate while anything is pending: the poll count
        # scales with the share, so one correction lands close.
        ratio = figures["fixed"]["polls"] / figures["capped"]["polls"]
        print(
            f"{name}: capped spent {figures['capped']['polls']} polls, fixed "
            f"{figures['fixed']['polls']}: to match, re-run with --capped-share "
            f"{min(1.0, capped * ratio):.3f}",
            flush=True,
        )
    text = [
        f"### Poll policies: {name} ({lifecycle.payments} payments on {lifecycle.keys} key)",
        "",
        f"Sandbox lifecycle `{lifecycle.describe()}` (outcomes paid 80% / expired 10% / "
        "cancelled 10% at the drawn time; --stay-pending ones expire at --expire-after). Every "
        f"policy ran at the same time on its own stack ({wall:.0f} s); fleets "
        f"`paypoll worker --processes {args.processes or 1} --threads {args.threads or 8}`. "
        "Fixed interval tuned so the pipeline spends the old backoff's expected poll count on "
        f"this lifecycle ({backoff_budget:.0f} polls, mean of 200 jitter draws, both from the "
        "keyed pipeline model in benchmarks/polling_model.py: creates first, slots 0.2 s "
        f"apart, 0.4 s dispatch): every {interval:.2f} s ({fixed_budget} polls modelled"
        f"{', interval given' if args.fixed_interval else ''}). Capped planner: share {capped:.3f} "
        f"({'given' if args.capped_share else 'modelled to spend the fixed row'}'s polls). "
        "Detection delay = sandbox first_seen_terminal_at - terminal_at; polls/s per key over "
        "the span from the first create to the last terminal state seen.",
        "",
        *rows,
        "",
        "Final states: " + "; ".join(f"{r.policy} {r.counts}" for r in results) + ".",
        "",
        *floors_table(floors),
    ]
    summary = {
        r.policy: {k: v for k, v in figures[r.policy].items() if k not in ("delays", "groups")}
        for r in results
    }
    print("POLLING-RESULT " + json.dumps({"lifecycle": name, "figures": summary}, default=str))
    return text, floors


# --- saturation --------------------------------------------------------------------------------
def run_saturation(
    sat: Saturation, policy: Policy, result: RunResult, *, processes: int, threads: int
) -> None:
    """Seed the pending payments, register them, run a fleet for the window, keep the stats."""
    from worker.connection import connect_redis
    from worker.keys import Keys
    from worker.store import PaymentStore

    accounts = make_accounts(sat.keys)
    started = time.monotonic()
    with stack(
        accounts, account_rate=RATE, rate=RATE, env=policy.env, pay_after=sat.pay_after, seed=5
    ) as st:
        settings = settings_for(st)
        redis = connect_redis(settings.redis_url)
        store = PaymentStore(
            redis=redis, keys=Keys(settings.key_prefix), events_maxlen=settings.events_maxlen
        )
        plan = []
        for a in accounts:
            ids = st.sandbox.seed(a.client_id, sat.pending_per_key, prefix=f"sat-{a.name}-")
            plan += [(a.name, f"sat-{a.name}-{i}", pid) for i, pid in enumerate(ids)]
        register_all(store, plan)
        result.launched_at = time.time()
        fleet = FleetProcess(st, processes=processes, threads=threads)
        try:
            pids = fleet.wait_workers()
            result.start_stats = st.sandbox.stats(payments=False)
            cpu0 = cpu_seconds(pids)
            end = time.monotonic() + sat.window
            while time.monotonic() < end:
                if fleet.process.poll() is not None:
                    raise RuntimeError(
                        f"{policy.name}: fleet exited: {fleet.log_path.read_text()[-1500:]}"
                    )
                time.sleep(min(5.0, max(0.0, end - time.monotonic())))
            result.stats = full_stats(st.sandbox.url, times=True)
            result.worker_cpu = cpu_seconds(pids) - cpu0
        finally:
            fleet.stop()
    result.wall = time.monotonic() - started


def saturation(args: argparse.Namespace, merged: bool) -> tuple[list[str], list]:
    base = SATURATION_QUICK if args.quick else SATURATION
    sat = Saturation(
        payments=args.payments or base.payments,
        keys=args.keys or base.keys,
        window=args.window or base.window,
    )
    chosen = policies(
        args.policies or list(SATURATION_POLICIES),
        interval=args.fixed_interval or 20.0,
        capped_share=args.capped_share or 0.5,
    )
    results = [RunResult(p.name, p.label(merged), p.share * RATE) for p in chosen]
    print(
        f"saturation: {sat.payments:,} pending on {sat.keys} keys, window {sat.window:g} s",
        flush=True,
    )
    started = time.monotonic()
    concurrently(
        [
            (
                lambda p=p, r=r: run_saturation(
                    sat, p, r, processes=args.processes or 2, threads=args.threads or 16
                )
            )
            for p, r in zip(chosen, results, strict=True)
        ]
    )
    wall = time.monotonic() - started
    SAVED["saturation"] = [dataclasses.asdict(r) for r in results]
    rows, figures = saturation_table(results, sat)
    floors = floor_rows("saturation", figures, premerge=not merged)
    text = [
        f"### Poll policies: saturation ({sat.payments:,} pending on {sat.keys} keys)",
        "",
        f"{sat.pending_per_key:,} payments per key made with `POST /_admin/seed` (the sandbox's "
        f"5/s limit stays real), all pending for the whole run (`--pay-after {sat.pay_after}`), "
        "registered with `PaymentStore.register_tracking` (first poll due at once), then "
        f"`paypoll worker --processes {args.processes or 2} --threads {args.threads or 16}` "
        f"per policy, all at the same time, measured for {sat.window:g} s after the workers ran "
        f"({wall:.0f} s in all). A payment's longest wait for a poll = the largest of: fleet "
        "start to its first poll, the largest gap between two of its polls (sandbox "
        "max_poll_gap), its last poll to the window's end. Poll budget per key = share x 5/s "
        "(backoff: the whole rate). polls/s per key: processed polls in the window / window; "
        "60 s min-max: the slowest and fastest whole minute of any key.",
        "",
        *rows,
        "",
        *floors_table(floors),
    ]
    summary = {r.policy: figures[r.policy] for r in results}
    print(
        "POLLING-RESULT " + json.dumps({"lifecycle": "saturation", "figures": summary}, default=str)
    )
    return text, floors


# --- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lifecycle", choices=("uniform", "long_tail", "saturation", "all"), default="all"
    )
    parser.add_argument(
        "--policies",
        type=lambda text: [p for p in text.split(",") if p],
        help=f"comma-separated, of {','.join(POLICIES)} (default: all; saturation: "
        f"{','.join(SATURATION_POLICIES)})",
    )
    parser.add_argument("--quick", action="store_true", help="shorter lifecycles (a smoke run)")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--save", type=Path, help="write every run's raw sandbox stats here (JSON), to re-read"
    )
    parser.add_argument("--fixed-interval", type=float, help="seconds (default: tuned)")
    parser.add_argument("--capped-share", type=float, help="(default: modelled)")
    parser.add_argument("--window", type=float, help="saturation: seconds measured")
    parser.add_argument("--payments", type=int, help="saturation: pending payments")
    parser.add_argument("--keys", type=int, help="saturation: keys")
    parser.add_argument("--processes", type=int, help="per fleet (default 1; saturation 2)")
    parser.add_argument("--threads", type=int, help="per process (default 8; saturation 16)")
    args = parser.parse_args(argv)
    for name in args.policies or []:
        if name not in POLICIES:
            parser.error(f"--policies: unknown policy {name!r}; expected some of {POLICIES}")
    if args.capped_share is not None and not 0 < args.capped_share <= 1:
        parser.error("--capped-share: must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    merged = planner_merged()
    if args.write_docs and not merged:
        print(
            "refusing --write-docs: this code has no poll planner yet (PAYPOLL_POLL_POLICY is "
            "ignored, so planner rows would show backoff)",
            file=sys.stderr,
        )
        return 2
    start_machine = machine()
    print(start_machine, flush=True)
    if not merged:
        print("NOTE: planner not merged: planner, round_robin and capped rows run as backoff")
    names = ["uniform", "long_tail", "saturation"] if args.lifecycle == "all" else [args.lifecycle]
    all_floors = []
    sections: dict[str, list[str]] = {}
    for name in names:
        text, floors = (
            saturation(args, merged) if name == "saturation" else light(args, name, merged)
        )
        end_load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        command = "benchmarks/polling.py" + "".join(" " + a for a in (argv or sys.argv[1:]))
        text[2:2] = [
            f"What: `.venv/bin/python {command}`. Machine: {start_machine}; load average at the "
            f"end {end_load}.",
            "",
        ]
        sections[name] = text
        all_floors += floors
        print("\n".join(text), flush=True)
        if args.save:
            args.save.write_text(json.dumps(SAVED))
    print("\nFloors (issue 11):\n" + "\n".join(floors_table(all_floors)))
    if args.write_docs:
        write_docs_section("polling", INTRO)
        for name, text in sections.items():
            write_docs_section(f"polling-{name}", "\n".join(text))
    limited = any(row[0].endswith("429s, every run") and row[1] != "0" for row in all_floors)
    return 1 if limited else 0


if __name__ == "__main__":
    sys.exit(main())
