"""How the demo shows its progress: a live ANSI block on a terminal, or one line per update.

The live block is :class:`worker.terminal.LiveBlock` (no curses, no terminal library).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from worker.store.states import ALL_STATES, FINAL
from worker.terminal import LiveBlock

BAR_WIDTH = 30  # characters of the progress bar


@dataclass(frozen=True)
class AccountLine:
    """One API key as the sandbox saw it."""

    name: str
    rps: float  # requests the sandbox accepted in its last second
    limit: float  # the key's limit
    peak_1s: int  # the most requests the sandbox accepted in any 1-second window so far
    rate_limited: int  # 429s answered so far


@dataclass(frozen=True)
class Progress:
    """A snapshot of the run."""

    elapsed: float
    total: int
    counts: Mapping[str, int]
    accounts: Sequence[AccountLine]

    @property
    def finished(self) -> int:
        """Payments in a state paypoll does nothing more about."""
        return sum(n for state, n in self.counts.items() if state in FINAL)


def _states_text(counts: Mapping[str, int]) -> str:
    return " ".join(f"{state}={counts[state]}" for state in ALL_STATES if counts.get(state))


def _account_text(line: AccountLine) -> str:
    return (
        f"{line.name}: {line.rps:g}/{line.limit:g} req/s now, peak {line.peak_1s} in 1s, "
        f"429s {line.rate_limited}"
    )


class PlainView:
    """One line per update: for logs, CI and pipes."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def message(self, text: str) -> None:
        """A line of its own (a start-up step, a warning)."""
        print(text, file=self.out, flush=True)

    def progress(self, snap: Progress) -> None:
        """One line: elapsed time, finished/total, states, and each account's rate and 429s."""
        accounts = "; ".join(_account_text(a) for a in snap.accounts)
        print(
            f"[{snap.elapsed:5.1f}s] {snap.finished}/{snap.total} done | "
            f"{_states_text(snap.counts) or 'nothing yet'} | {accounts}",
            file=self.out,
            flush=True,
        )

    def close(self) -> None:
        """Nothing to restore for plain output."""


class LiveView(PlainView):
    """A block redrawn in place: a progress bar, the states, and one line per account."""

    def __init__(self, out: TextIO | None = None) -> None:
        super().__init__(out)
        self._block = LiveBlock(self.out)

    def message(self, text: str) -> None:
        self._block.clear()
        super().message(text)

    def progress(self, snap: Progress) -> None:
        done = snap.finished
        filled = int(BAR_WIDTH * done / snap.total) if snap.total else BAR_WIDTH
        lines = [
            f"  [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{snap.total} done"
            f"  ({snap.elapsed:.1f}s)",
            f"  states: {_states_text(snap.counts) or 'nothing yet'}",
            *(f"  {_account_text(a)}" for a in snap.accounts),
        ]
        self._block.draw(lines)

    def close(self) -> None:
        """Leave the last block on screen and the cursor below it."""
        self._block.leave()


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The human-readable summary of a finished (or interrupted) run."""
    states = summary["states"]
    latency = summary["latency_seconds"]

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1000:.0f} ms"

    polls = summary["polls_per_payment"]
    peaks = ", ".join(f"{name} {n}" for name, n in summary["sandbox"]["max_accepted_in_1s"].items())
    lines = [
        "",
        "summary" + (" (interrupted)" if summary["interrupted"] else ""),
        f"  payments submitted  {summary['payments']} over {len(summary['accounts'])} accounts "
        f"({', '.join(summary['accounts'])})",
        f"  created on the API  {summary['sandbox']['creates']} "
        f"(duplicate creates: {len(summary['sandbox']['duplicates'])})",
        f"  outcomes            paid {states.get('paid', 0)}, expired {states.get('expired', 0)}, "
        f"cancelled {states.get('cancelled', 0)}"
        + "".join(
            f", {state} {n}"
            for state, n in states.items()
            if n and state not in {"paid", "expired", "cancelled"}
        ),
        f"  polls per payment   mean {polls['mean']:.1f}, max {polls['max']}",
        f"  API latency         p50 {ms(latency['p50'])}, p99 {ms(latency['p99'])} "
        f"({latency['calls']:.0f} calls, from paypoll_api_call_seconds buckets)",
        f"  429s                {summary['sandbox']['rate_limited']} "
        f"(busiest 1-second window per key: {peaks}; limit {summary['rate']:g})",
        f"  API requests        {summary['sandbox']['requests']}",
        f"  duration            {summary['duration_seconds']:.1f} s",
        f"  redis               {summary['redis']}",
        f"  metrics             {summary['metrics_url']}"
        + ("" if summary["keep_running"] else " (stopped with the demo; --keep-running keeps it)"),
    ]
    return lines
