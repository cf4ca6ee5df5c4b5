"""What the sandbox saw, per API key: counts by route and status, and 1-second window maxima.

Kept incrementally (O(1) amortised per request) so ``GET /_admin/stats`` stays cheap after
100k requests. The window maxima are exact over the recorded arrival timestamps, with the
same half-open windows (t - 1 s, t] as the sliding limiter.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

PER_SECOND_KEPT = 86_400  # seconds of per-second poll counts kept per client (a day)


class WindowMax:
    """The largest number of timestamps in any window (t - 1 s, t], over all appended ones."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0  # index of the oldest timestamp inside the window ending at the last
        self._max = 0
        self._in_order = True

    def add(self, at: float) -> None:
        times = self.times
        if times and at < times[-1]:
            # The wall clock stepped back: fall back to an exact recount when asked.
            self._in_order = False
        times.append(at)
        if not self._in_order:
            return
        start = self._start
        while times[start] <= at - 1.0:
            start += 1
        self._start = start
        self._max = max(self._max, len(times) - start)

    @property
    def maximum(self) -> int:
        if self._in_order:
            return self._max
        ordered = sorted(self.times)
        best = start = 0
        for end, at in enumerate(ordered):
            while ordered[start] <= at - 1.0:
                start += 1
            best = max(best, end - start + 1)
        return best


class PerSecond:
    """Counts per whole second of the clock, for the last ``kept`` seconds up to the latest
    one counted: bounded by the run's length, never by the number of events."""

    def __init__(self, kept: int = PER_SECOND_KEPT) -> None:
        self.counts: deque[int] = deque(maxlen=kept)
        self.last = 0  # the second counts[-1] counts (floor of epoch seconds)

    def add(self, at: float) -> None:
        second = math.floor(at)
        counts = self.counts
        if not counts or second > self.last:
            gap = min(second - self.last - 1, counts.maxlen or 0) if counts else 0
            counts.extend([0] * gap)
            counts.append(1)
            self.last = second
            return
        back = self.last - second  # an arrival judged after a later one (threads)
        if back < len(counts):
            counts[len(counts) - 1 - back] += 1

    def public(self) -> dict[str, Any]:
        return {"start": self.last - len(self.counts) + 1, "counts": list(self.counts)}


class ClientStats:
    """Counts for one client_id (or ``ANONYMOUS`` for requests no key could be told for)."""

    def __init__(self) -> None:
        self.requests: dict[str, dict[str, int]] = {}
        self.total = 0
        self.rate_limited = 0
        self.token_calls = 0
        self.faults: dict[str, int] = {}
        self.accepted = WindowMax()
        self.arrivals = WindowMax()
        self.refused_times: list[float] = []
        self.polls = 0
        self.first_poll_at: float | None = None
        self.last_poll_at: float | None = None
        self.polls_per_second = PerSecond()

    def polled(self, at: float) -> None:
        """A poll (GET of one of this client's payments) arrived at ``at`` and was processed."""
        self.polls += 1
        if self.first_poll_at is None or at < self.first_poll_at:
            self.first_poll_at = at
        if self.last_poll_at is None or at > self.last_poll_at:
            self.last_poll_at = at
        self.polls_per_second.add(at)

    def arrival(self, at: float, *, accepted: bool) -> None:
        """A request reached the limiter at ``at`` and was accepted (or refused with 429)."""
        self.arrivals.add(at)
        if accepted:
            self.accepted.add(at)
        else:
            self.rate_limited += 1
            self.refused_times.append(at)

    def answered(self, route: str, status: str, *, fault: str | None) -> None:
        """A request to ``route`` ended with ``status`` (a code, or ``dropped``)."""
        self.total += 1
        by_status = self.requests.setdefault(route, {})
        by_status[status] = by_status.get(status, 0) + 1
        if route == "POST /oauth/token":
            self.token_calls += 1
        if fault is not None:
            self.faults[fault] = self.faults.get(fault, 0) + 1

    def public(self, *, times: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "requests": {route: dict(statuses) for route, statuses in self.requests.items()},
            "total": self.total,
            "rate_limited": self.rate_limited,
            "max_accepted_in_1s": self.accepted.maximum,
            "max_requests_in_1s": self.arrivals.maximum,
            "token_calls": self.token_calls,
            "faults": dict(self.faults),
            "polls": self.polls,
            "first_poll_at": self.first_poll_at,
            "last_poll_at": self.last_poll_at,
        }
        if times:
            data["polls_per_second"] = self.polls_per_second.public()
            data["accepted_times"] = list(self.accepted.times)
            data["rate_limited_times"] = list(self.refused_times)
        return data
