"""The polling benchmark's lifecycles, and the models that tune its fixed and capped rows
before the run (so every policy can run side by side): pure functions, no I/O.

- The drawn lifecycle: a fresh sandbox draws payment i's plan from (seed, 0, i) only
  (worker/sandbox/lifecycle.py), so the script knows every payment's time to terminal before
  the run.
- The fixed interval: the interval at which the pipeline spends the old backoff schedule's
  expected poll count on that lifecycle. Both counts come from a model of the pipeline on a
  key (sim_keyed: creates first, slots 1/rate apart, earliest due first, a dispatch delay),
  the backoff's averaged over fresh jitter draws: a plain "created + k x I" count misses
  that 25 payments' early polls want more than 5/s and wait for slots.
- The capped planner's share: the planner spends its share of the rate whenever a pending
  payment may be polled (min gap permitting), so on one key it spends about
  integral of min(share x rate, pending(t) / min_gap) dt; the share is the one whose integral
  is the fixed interval's poll count. A model, not a measurement: the report prints the real
  counts of both rows side by side.
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from worker.sandbox.config import NO_TAIL, OUTCOME_WEIGHTS
from worker.sandbox.lifecycle import LifecycleSettings, draw_plan
from worker.schedule import PollSchedule

RATE = 5.0  # requests per second per key (api-contract.md)
CREATE_GAP = 1 / RATE  # creates go out one slot apart on their key
MIN_GAP = 1.0  # PAYPOLL_POLL_MIN_GAP's default (issue 11)


@dataclass(frozen=True)
class Lifecycle:
    """How a light-load lifecycle's payments are made and drawn (sandbox options)."""

    name: str
    payments: int
    keys: int
    pay_after: tuple[float, float]
    tail: tuple[float, float, float] = NO_TAIL
    stay_pending: float = 0.0
    expire_after: float = 600.0
    seed: int = 11

    def sandbox_kwargs(self) -> dict[str, object]:
        """The sandbox's lifecycle options (tests/sandbox_fixture.py keyword form)."""
        return {
            "pay_after": f"{self.pay_after[0]:g}:{self.pay_after[1]:g}",
            "pay_after_tail": ":".join(f"{x:g}" for x in self.tail),
            "stay_pending": f"{self.stay_pending:g}",
            "expire_after": f"{self.expire_after:g}",
            "seed": self.seed,
        }

    def describe(self) -> str:
        """The sandbox options as a reader would type them."""
        return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.sandbox_kwargs().items())

    def offsets(self) -> list[float]:
        """Seconds from creation to terminal of the payments, in creation order."""
        settings = LifecycleSettings(
            pay_after=self.pay_after,
            outcomes=dict(OUTCOME_WEIGHTS),
            stay_pending=self.stay_pending,
            expire_after=self.expire_after,
            unknown_status=0.0,
            unknown_status_name="processing",
            pay_after_tail=self.tail,
        )
        return [
            draw_plan(settings, seed=self.seed, generation=0, index=i, created_at=0.0).terminal_at
            for i in range(self.payments)
        ]


LIGHT = {
    # Issue 11's measurement: 25 payments on one key, payers uniform 5-120 s.
    "uniform": Lifecycle("uniform", payments=25, keys=1, pay_after=(5.0, 120.0)),
    # Most payers within a minute, a quarter of the payers (a fifth of all) after minutes,
    # a fifth never paying: expired at 450 s.
    "long_tail": Lifecycle(
        "long_tail",
        payments=40,
        keys=1,
        pay_after=(5.0, 60.0),
        tail=(0.25, 120.0, 420.0),
        stay_pending=0.2,
        expire_after=450.0,
    ),
}
LIGHT_QUICK = {
    "uniform": Lifecycle("uniform", payments=25, keys=1, pay_after=(5.0, 40.0)),
    "long_tail": Lifecycle(
        "long_tail",
        payments=25,
        keys=1,
        pay_after=(5.0, 30.0),
        tail=(0.25, 60.0, 150.0),
        stay_pending=0.2,
        expire_after=180.0,
    ),
}


@dataclass(frozen=True)
class Saturation:
    """Far more pending payments than the budget polls: all pending for the whole window."""

    payments: int
    keys: int
    window: float  # seconds measured after the fleet's workers run

    @property
    def pending_per_key(self) -> int:
        return self.payments // self.keys

    @property
    def pay_after(self) -> str:
        """A lifecycle under which nobody pays within the run (setup included)."""
        return f"{self.window + 3600:g}:{self.window + 7200:g}"


SATURATION = Saturation(payments=50_000, keys=10, window=2500.0)
SATURATION_QUICK = Saturation(payments=1_000, keys=2, window=300.0)


# --- the old schedule and a fixed interval, simulated --------------------------------------
DISPATCH = 0.4  # seconds from a poll's due time to its send, unloaded (sweeper pass, queue)


def sim_keyed(
    offsets: list[float],
    next_delay: Callable[[int], float],
    *,
    keys: int = 1,
    rate: float = RATE,
    first_delay: float,
    dispatch: float = DISPATCH,
) -> tuple[list[int], list[float]]:
    """(polls, detection delays) per payment of a pipeline polling after ``next_delay(k)``
    (seconds after the k-th poll), its keys' slots ``1/rate`` apart, due polls served
    earliest due first and creates (one per payment, in order, at start) before any poll:
    the limiter makes early polls late when demand passes the rate, as on the real key."""
    polls = [0] * len(offsets)
    delays = [0.0] * len(offsets)
    gap = 1.0 / rate
    for key in range(keys):
        mine = list(range(key, len(offsets), keys))
        created = {i: n * gap for n, i in enumerate(mine)}
        free = len(mine) * gap  # the key's next free slot once every create is sent
        due = [(created[i] + first_delay, i) for i in mine]
        heapq.heapify(due)
        while due:
            at, i = heapq.heappop(due)
            sent = max(at + dispatch, free)
            free = sent + gap
            polls[i] += 1
            terminal = created[i] + offsets[i]
            if sent >= terminal:
                delays[i] = sent - terminal
            else:
                heapq.heappush(due, (sent + next_delay(polls[i]), i))
    return polls, delays


def backoff_polls(offsets: list[float], *, keys: int = 1, runs: int = 200, seed: int = 1) -> float:
    """The default backoff schedule's expected total poll count on these payments, through
    the keyed pipeline model (sim_keyed), mean over ``runs`` jitter draws."""
    rng = random.Random(seed)
    schedule = PollSchedule()
    totals = [
        sum(
            sim_keyed(
                offsets,
                lambda k: schedule.delay(k, rng),
                keys=keys,
                first_delay=schedule.first_delay,
            )[0]
        )
        for _ in range(runs)
    ]
    return statistics.fmean(totals)


def fixed_polls(offsets: list[float], interval: float, *, keys: int = 1) -> int:
    """Total polls of the pipeline polling every ``interval`` (keyed model)."""
    polls, _ = sim_keyed(offsets, lambda k: interval, keys=keys, first_delay=interval)
    return sum(polls)


def fixed_interval_for(offsets: list[float], budget: float, *, keys: int = 1) -> float:
    """The smallest interval at which the pipeline spends at most ``budget`` polls (keyed
    model; the count falls as the interval grows)."""
    low, high = 0.2, max(offsets) + 1
    for _ in range(40):
        mid = (low + high) / 2
        if fixed_polls(offsets, mid, keys=keys) > budget:
            low = mid
        else:
            high = mid
    return high


# --- the planner's poll count at a share, modelled -----------------------------------------
def planner_polls(
    offsets: list[float],
    share: float,
    *,
    keys: int = 1,
    rate: float = RATE,
    min_gap: float = MIN_GAP,
    step: float = 0.05,
) -> float:
    """Polls a planner at ``share`` spends on these payments (spread round-robin over
    ``keys``, created one slot apart per key): per key, the integral over time of
    min(share x rate, pending / min_gap)."""
    total = 0.0
    for key in range(keys):
        mine = offsets[key::keys]
        spans = [(n * CREATE_GAP, n * CREATE_GAP + o) for n, o in enumerate(mine)]
        end = max(stop for _, stop in spans)
        t = 0.0
        while t < end:
            pending = sum(1 for start, stop in spans if start <= t < stop)
            total += min(share * rate, pending / min_gap) * step
            t += step
    return total


def share_for(offsets: list[float], polls: float, *, keys: int = 1, rate: float = RATE) -> float:
    """The share at which the modelled planner spends ``polls`` (clamped to [0.01, 1])."""
    low, high = 0.01, 1.0
    if planner_polls(offsets, high, keys=keys, rate=rate) <= polls:
        return high
    for _ in range(30):
        mid = (low + high) / 2
        if planner_polls(offsets, mid, keys=keys, rate=rate) > polls:
            high = mid
        else:
            low = mid
    return low
