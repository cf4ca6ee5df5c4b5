"""Figures and tables of the polling benchmark, from what the sandboxes saw (no I/O).

Everything is measured from outside the fleet: the sandbox's per-payment terminal_at and
first_seen_terminal_at (detection delay), polls, first/last poll and the largest gap between
two polls, and per key its processed polls and 429s (worker/sandbox/__init__.py has the schema).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from common import percentile, window_max
from polling_model import RATE, Lifecycle, Saturation

ISSUE_UNIFORM = (1.0, 2.5)  # issue 11's floor on uniform: detection p50 and p95, seconds
TAIL_GAIN = 0.30  # capped planner's p95 at least this much below the fixed interval's
GAP_FACTOR = 1.5  # saturation: each payment polled at least every 1.5 x pending / budget
RATE_TOLERANCE = 0.02  # saturation: polls/s within 2% of the poll budget


@dataclass
class RunResult:
    """One policy's run on one lifecycle: what its sandbox saw, and when."""

    policy: str
    label: str  # what the table shows (says when the policy was not there to run)
    budget_per_key: float  # polls/s the policy may spend per key
    stats: dict[str, Any] = field(default_factory=dict)  # the sandbox's at the end
    start_stats: dict[str, Any] = field(default_factory=dict)  # saturation: at window start
    launched_at: float = 0.0  # epoch s the fleet was started
    counts: dict[str, int] = field(default_factory=dict)  # final states (light runs)
    worker_cpu: float = math.nan  # CPU seconds of the fleet's worker processes
    wall: float = 0.0


def rate_limited(stats: dict[str, Any]) -> int:
    """429s the sandbox answered, over every key."""
    return sum(c["rate_limited"] for c in stats["clients"].values())


def fmt(value: float, unit: str = " s", digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}{unit}"


# --- light load ------------------------------------------------------------------------------
def light_figures(result: RunResult, lifecycle: Lifecycle) -> dict[str, Any]:
    """Detection delays, polls and budget used of one light-load run."""
    payments = list(result.stats["payments"].values())
    delays = [
        p["first_seen_terminal_at"] - p["terminal_at"]
        for p in payments
        if p["terminal_at"] is not None and p["first_seen_terminal_at"] is not None
    ]
    groups: dict[str, list[float]] = {}
    for p in payments:
        if p["terminal_at"] is None or p["first_seen_terminal_at"] is None:
            continue
        offset = p["planned_terminal_at"] - p["created_at"]
        if offset <= lifecycle.pay_after[1] + 1e-6:
            group = f"paid/final within {lifecycle.pay_after[1]:g} s"
        elif abs(offset - lifecycle.expire_after) < 1e-6 and lifecycle.stay_pending > 0:
            group = f"never paid, expired at {lifecycle.expire_after:g} s"
        else:
            group = f"tail {lifecycle.tail[1]:g}-{lifecycle.tail[2]:g} s"
        groups.setdefault(group, []).append(p["first_seen_terminal_at"] - p["terminal_at"])
    polls = sum(p["polls"] for p in payments)
    start = min(p["created_at"] for p in payments)
    seen = [p["first_seen_terminal_at"] for p in payments if p["first_seen_terminal_at"]]
    span = (max(seen) - start) if seen else math.nan
    per_key = polls / span / lifecycle.keys if span else math.nan
    return {
        "delays": delays,
        "groups": groups,
        "seen": len(delays),
        "payments": len(payments),
        "polls": polls,
        "polls_per_payment": polls / len(payments),
        "span": span,
        "polls_per_s_key": per_key,
        "of_rate": per_key / RATE,
        "of_budget": per_key / result.budget_per_key,
        "limited": rate_limited(result.stats),
        "max_1s": max(c["max_accepted_in_1s"] for c in result.stats["clients"].values()),
    }


def light_table(results: list[RunResult], lifecycle: Lifecycle) -> tuple[list[str], dict]:
    """The markdown rows of one light lifecycle, and the figures by policy."""
    figures = {r.policy: light_figures(r, lifecycle) for r in results}
    lines = [
        "| policy | detection p50 | p95 | max | polls per payment | polls | polls/s per key "
        "(of rate 5/s; of its budget) | 429s | most accepted in 1 s | worker CPU | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f = figures[r.policy]
        d = f["delays"]
        lines.append(
            f"| {r.label} | {fmt(percentile(d, 50))} | {fmt(percentile(d, 95))} | "
            f"{fmt(max(d, default=math.nan))} | {f['polls_per_payment']:.1f} | {f['polls']} | "
            f"{f['polls_per_s_key']:.2f} ({f['of_rate']:.0%}; {f['of_budget']:.0%}) | "
            f"{f['limited']} | {f['max_1s']} | {fmt(r.worker_cpu)} | {r.wall:.0f} s |"
        )
    names = sorted({g for f in figures.values() for g in f["groups"]})
    if len(names) > 1:
        lines += [
            "",
            "Detection delay p50 / p95 (max) by kind of payment:",
            "",
            "| policy | "
            + " | ".join(
                f"{n} ({len(figures[results[0].policy]['groups'].get(n, []))})" for n in names
            )
            + " |",
            "|---|" + "---|" * len(names),
        ]
        for r in results:
            cells = []
            for n in names:
                d = figures[r.policy]["groups"].get(n, [])
                cells.append(
                    f"{fmt(percentile(d, 50))} / {fmt(percentile(d, 95))} "
                    f"({fmt(max(d, default=math.nan))})"
                )
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return lines, figures


# --- saturation ------------------------------------------------------------------------------
def saturation_figures(result: RunResult, sat: Saturation) -> dict[str, Any]:
    """Polls/s per key against the budget, and each payment's longest wait for a poll."""
    t_start, t_end = result.start_stats["now"], result.stats["now"]
    window = t_end - t_start
    per_key = []
    smooth: list[float] = []
    max_1s = 0
    for cid, end in result.stats["clients"].items():
        begin = result.start_stats["clients"].get(cid, {}).get("polls", 0)
        per_key.append((end["polls"] - begin) / window)
        max_1s = max(max_1s, window_max(end.get("accepted_times", []), t_start, t_end))
        counts = end.get("polls_per_second", {"start": 0, "counts": []})
        inside = [
            c
            for s, c in enumerate(counts["counts"], start=counts["start"])
            if t_start + 1 <= s and s + 1 <= t_end
        ]
        smooth += [statistics.fmean(inside[i : i + 60]) for i in range(0, len(inside) - 59, 60)]
    worst = []
    never = 0
    for p in result.stats["payments"].values():
        if p["first_poll_at"] is None:
            never += 1
            worst.append(t_end - result.launched_at)
        else:
            worst.append(
                max(
                    p["first_poll_at"] - result.launched_at,
                    p["max_poll_gap"],
                    t_end - p["last_poll_at"],
                )
            )
    mean_rate = statistics.fmean(per_key) if per_key else math.nan
    return {
        "window": window,
        "polls_per_s_key": mean_rate,
        "key_min": min(per_key, default=math.nan),
        "key_max": max(per_key, default=math.nan),
        "minute_min": min(smooth, default=math.nan),
        "minute_max": max(smooth, default=math.nan),
        "of_rate": mean_rate / RATE,
        "of_budget": mean_rate / result.budget_per_key,
        "gap_p50": percentile(worst, 50),
        "gap_p99": percentile(worst, 99),
        "gap_max": max(worst, default=math.nan),
        "gap_floor": GAP_FACTOR * sat.pending_per_key / result.budget_per_key,
        "never": never,
        "limited": rate_limited(result.stats),
        "max_1s": max_1s,
    }


def saturation_table(results: list[RunResult], sat: Saturation) -> tuple[list[str], dict]:
    """The markdown rows of the saturation runs, and the figures by policy."""
    figures = {r.policy: saturation_figures(r, sat) for r in results}
    lines = [
        "| policy | poll budget per key | polls/s per key (keys min-max; 60 s min-max) | of rate "
        "| of budget | longest wait for a poll p50 / p99 / max | 1.5 x pending / budget | "
        "never polled | 429s | most accepted in 1 s | worker CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f = figures[r.policy]
        lines.append(
            f"| {r.label} | {r.budget_per_key:.2f}/s | {f['polls_per_s_key']:.3f} "
            f"({f['key_min']:.2f}-{f['key_max']:.2f}; {f['minute_min']:.2f}-{f['minute_max']:.2f}) "
            f"| {f['of_rate']:.1%} | {f['of_budget']:.1%} | {fmt(f['gap_p50'], ' s', 0)} / "
            f"{fmt(f['gap_p99'], ' s', 0)} / {fmt(f['gap_max'], ' s', 0)} | "
            f"{f['gap_floor']:.0f} s | {f['never']} | {f['limited']} | {f['max_1s']} | "
            f"{fmt(r.worker_cpu)} |"
        )
    return lines, figures


# --- floors ----------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def floor_rows(
    lifecycle: str, figures: dict[str, dict[str, Any]], premerge: bool
) -> list[tuple[str, str, str, str]]:
    """(floor, measured, wanted, verdict) rows of issue 11's floors this lifecycle decides."""
    rows: list[tuple[str, str, str, str]] = []
    note = " (pre-merge: the planner did not run)" if premerge else ""
    planner, fixed, capped = figures.get("planner"), figures.get("fixed"), figures.get("capped")
    if lifecycle == "uniform" and planner:
        p50, p95 = percentile(planner["delays"], 50), percentile(planner["delays"], 95)
        rows.append(
            (
                f"uniform, planner: detection p50 / p95{note}",
                f"{p50:.2f} s / {p95:.2f} s",
                f"<= {ISSUE_UNIFORM[0]:g} s / <= {ISSUE_UNIFORM[1]:g} s",
                verdict(p50 <= ISSUE_UNIFORM[0] and p95 <= ISSUE_UNIFORM[1]),
            )
        )
    if fixed and capped:
        cp = (percentile(capped["delays"], 50), percentile(capped["delays"], 95))
        fx = (percentile(fixed["delays"], 50), percentile(fixed["delays"], 95))
        ratio = capped["polls"] / fixed["polls"]
        measured = (
            f"capped {cp[0]:.2f} / {cp[1]:.2f} s with {capped['polls']} polls; fixed "
            f"{fx[0]:.2f} / {fx[1]:.2f} s with {fixed['polls']} (polls ratio {ratio:.2f})"
        )
        if lifecycle == "uniform":
            wanted, ok = "capped p50 and p95 <= fixed's", cp[0] <= fx[0] and cp[1] <= fx[1]
        else:
            wanted = f"capped p95 <= {1 - TAIL_GAIN:.0%} of fixed's"
            ok = cp[1] <= (1 - TAIL_GAIN) * fx[1]
        rows.append((f"{lifecycle}, capped planner vs fixed{note}", measured, wanted, verdict(ok)))
        rows.append(
            (
                f"{lifecycle}, capped planner spent the fixed interval's polls{note}",
                f"ratio {ratio:.2f}",
                "0.95-1.05 (else re-run with --capped-share)",
                verdict(0.95 <= ratio <= 1.05),
            )
        )
    if lifecycle == "saturation" and planner:
        rows.append(
            (
                f"saturation, planner: longest wait for a poll, p99{note}",
                f"{planner['gap_p99']:.0f} s",
                f"<= {planner['gap_floor']:.0f} s",
                verdict(planner["gap_p99"] <= planner["gap_floor"]),
            )
        )
        rows.append(
            (
                f"saturation, planner: polls/s vs budget{note}",
                f"{planner['of_budget']:.1%}",
                f"{1 - RATE_TOLERANCE:.0%}-{1 + RATE_TOLERANCE:.0%}",
                verdict(abs(planner["of_budget"] - 1) <= RATE_TOLERANCE),
            )
        )
    limited = sum(f["limited"] for f in figures.values())
    rows.append((f"{lifecycle}: 429s, every run", str(limited), "0", verdict(limited == 0)))
    return rows


def floors_table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    return [
        "| floor | measured | wanted | |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
    ]
