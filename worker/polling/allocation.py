"""Where a key's poll budget goes: pure functions of pending ages, hazard and budget.

The square-root rule: polling a payment every tau seconds costs 1/tau polls per second and
leaves it, if it completes meanwhile, noticed tau/2 late on average; at completion rate h the
expected delay accrues at h*tau/2 per second. Minimising the sum over pending payments with
the polls per second fixed (a Lagrange multiplier) gives tau_i proportional to 1/sqrt(h_i):
poll rate proportional to the square root of the hazard at each payment's age.

A plan makes this concrete. Every payment accrues *urgency* at ``w(age) = sqrt(hazard(age))``
per second (1 for round_robin); it is polled when its urgency since its last poll reaches the
threshold ``K``. Its poll rate is then w/K, so K is chosen such that the pending payments'
rates add up to the poll budget, each rate clamped to [fair / STARVATION_BOUND, 1 / min_gap]
(fair = budget / pending): a light load polls everything every min_gap (K = 0), a saturated
key still polls every payment at least once per STARVATION_BOUND x pending / budget seconds.
Each payment's next poll time follows from the plan in O(bins) (:func:`next_poll_delay`);
the durable timer then serves due polls oldest first at the budget's pace
(:class:`PollPacer`), so the order under saturation follows the plan, not a scan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from worker import defaults
from worker.polling.model import AGE_EDGES, BINS, CompletionModel, bin_of

POLICIES_WITH_PLAN = ("planner", "round_robin")


def urgency_weights(model: CompletionModel, policy: str) -> tuple[float, ...]:
    """Urgency per second in each age bin: sqrt(hazard) for the planner, 1 for round_robin."""
    if policy == "round_robin":
        return (1.0,) * BINS
    return tuple(math.sqrt(h) for h in model.hazards())


@dataclass(frozen=True)
class Plan:
    """One key's poll plan: a payment is due when its urgency since its last poll reaches
    ``threshold`` (0: at once, i.e. every min_gap), and never later than ``max_interval``."""

    threshold: float
    max_interval: float
    budget: float  # polls per second the plan spends
    weights: tuple[float, ...]  # urgency per second in each age bin

    @classmethod
    def idle(cls, weights: Sequence[float] | None = None) -> Plan:
        """The plan of a key with nothing pending, or before any plan was made: every min_gap."""
        return cls(0.0, defaults.POLL_MAX_GAP, 0.0, tuple(weights or (1.0,) * BINS))


def planned_rates(
    counts: Sequence[int],
    weights: Sequence[float],
    threshold: float,
    *,
    min_gap: float,
    min_rate: float,
) -> list[float]:
    """Poll rate of one payment in each age bin under ``threshold``, clamped to
    [min_rate, 1 / min_gap]."""
    top = 1.0 / min_gap
    if threshold <= 0:
        return [top] * len(counts)
    return [min(top, max(min_rate, w / threshold)) for w in weights]


def _usable(counts: Sequence[int], weights: Sequence[float]) -> tuple[float, ...]:
    """Weights that can spend any budget: a zero weight becomes a tiny positive one (such a
    payment is polled at the starvation bound, yet can take budget nobody else can use), and
    when every pending payment weighs zero, all weigh the same (round robin)."""
    top = max((w for c, w in zip(counts, weights, strict=True) if c), default=0.0)
    if top <= 0:
        return (1.0,) * len(weights)
    return tuple(max(w, top * 1e-9) for w in weights)


def solve_plan(
    counts: Sequence[int],
    weights: Sequence[float],
    budget: float,
    *,
    min_gap: float = defaults.POLL_MIN_GAP,
    max_gap: float = defaults.POLL_MAX_GAP,
    starvation_bound: float = defaults.POLL_STARVATION_BOUND,
    cost: float = 0.0,
) -> Plan:
    """The plan that spends ``budget`` polls/s on ``counts[i]`` pending payments per age bin.

    Promises: the planned rates add up to at most ``budget`` (exactly, within 1e-6, when the
    pending payments could take more than the budget at min_gap); no payment is planned
    faster than 1/min_gap; none slower than budget / (starvation_bound x pending) or 1/max_gap.

    ``cost`` > 0 prices a poll in seconds of detection delay: a poll is made only where it
    saves at least that much. Minimising sum(h_i tau_i / 2 + cost / tau_i) gives
    tau_i = sqrt(2 cost) / sqrt(h_i), i.e. the threshold sqrt(2 cost); the budget stays a cap
    (the larger threshold wins) and a priced plan leaves spare budget unspent.
    """
    pending = sum(counts)
    weights = _usable(counts, weights)
    if pending == 0 or budget <= 0:
        return Plan(0.0, max_gap, 0.0, tuple(weights))
    if pending / min_gap <= budget:
        if cost > 0:
            return _priced(counts, weights, cost, min_gap=min_gap, max_gap=max_gap)
        return Plan(0.0, max_gap, pending / min_gap, tuple(weights))
    fair = budget / pending
    min_rate = max(fair / starvation_bound, 1.0 / max_gap)
    if min_rate * pending >= budget:
        # max_gap asks for more than the budget: plain round robin at the budget (a priced
        # plan would ask for more still).
        return Plan(math.inf, pending / budget, budget, tuple(weights))

    def spent(k: float) -> float:
        rates = planned_rates(counts, weights, k, min_gap=min_gap, min_rate=min_rate)
        return sum(c * r for c, r in zip(counts, rates, strict=True))

    # spent() falls from pending/min_gap (k -> 0) to min_rate*pending (k -> inf): bisect log k.
    low, high = 1e-12, 1.0
    while spent(high) > budget:
        high *= 4.0
        if high > 1e12:
            break
    for _ in range(100):
        mid = math.sqrt(low * high)
        if spent(mid) > budget:
            low = mid
        else:
            high = mid
        if high / low < 1 + 1e-9:
            break
    if cost > 0 and math.sqrt(2 * cost) > high:
        return _priced(counts, weights, cost, min_gap=min_gap, max_gap=max_gap)
    return Plan(high, min(max_gap, 1.0 / min_rate), spent(high), tuple(weights))


def _priced(
    counts: Sequence[int],
    weights: tuple[float, ...],
    cost: float,
    *,
    min_gap: float,
    max_gap: float,
) -> Plan:
    """The plan at the price threshold sqrt(2 cost), within the gaps (below the budget)."""
    threshold = math.sqrt(2 * cost)
    rates = planned_rates(counts, weights, threshold, min_gap=min_gap, min_rate=1.0 / max_gap)
    spent = sum(c * r for c, r in zip(counts, rates, strict=True))
    return Plan(threshold, max_gap, spent, weights)


def next_poll_delay(plan: Plan, age: float, *, min_gap: float = defaults.POLL_MIN_GAP) -> float:
    """Seconds from now until a payment of ``age`` is due: when its urgency reaches the plan's
    threshold, within [min_gap, plan.max_interval]."""
    if plan.threshold <= 0:
        return min_gap
    if math.isinf(plan.threshold):
        return max(min_gap, plan.max_interval)
    need, t = plan.threshold, max(0.0, age)
    i = bin_of(t)
    while i < BINS:
        w = plan.weights[i]
        end = AGE_EDGES[i + 1] if i < BINS - 1 else math.inf
        if w > 0 and w * (end - t) >= need:
            t += need / w
            break
        if w > 0:
            need -= w * (end - t)
        t = end
        i += 1
        if t - age >= plan.max_interval:
            break
    return min(max(min_gap, t - age), max(min_gap, plan.max_interval))


def poll_budget(
    *,
    rate: float,
    share: float,
    floor: float,
    creates_waiting: bool,
    shared_rate: float = 0.0,
) -> float:
    """Polls per second a key may spend now: ``share`` of its rate less what other software
    took through the shared limiter, or only ``floor`` of it while creates wait (creates keep
    priority; the floor keeps tracking alive under a create backlog). Never below floor x rate."""
    if creates_waiting:
        return floor * rate
    return max(floor * rate, share * rate - max(0.0, shared_rate))


def key_capacity(rate: float, margin: float) -> float:
    """Calls per second the limiter grants a key at most: one per slot of 1/floor(rate) + margin
    seconds (worker/ratelimit)."""
    return 1.0 / (1.0 / max(1.0, math.floor(rate)) + margin)


def create_budget(*, capacity: float, poll_budget: float, tracking: bool) -> float:
    """Creates per second a key may start: what the limiter grants less what polls may take
    while payments are tracked, so creates and polls together never queue in the limiter
    (a queue deeper than max_wait turns every call into a held far slot)."""
    return max(0.0, capacity - (poll_budget if tracking else 0.0))


@dataclass
class PollPacer:
    """Turns a poll budget into whole polls per sweeper pass, carrying the fractions.

    Credit accrues at the budget and is capped at ``burst_seconds`` of it (at least one poll),
    so an idle key does not bank a burst; each pass may dispatch ``quota()`` polls and reports
    what it dispatched with ``spend``.
    """

    burst_seconds: float = 1.0
    credit: float = 0.0

    def accrue(self, budget: float, elapsed: float) -> None:
        """Add ``elapsed`` seconds of ``budget`` polls/s to the credit, up to the cap."""
        cap = max(1.0, budget * self.burst_seconds)
        self.credit = min(cap, self.credit + max(0.0, budget) * max(0.0, elapsed))

    def quota(self) -> int:
        """Whole polls this pass may dispatch."""
        return max(0, math.floor(self.credit + 1e-9))

    def spend(self, polls: int) -> None:
        """Take ``polls`` dispatched polls off the credit."""
        self.credit = max(min(self.credit, 0.0), self.credit - polls)

    def lend_one(self, to: PollPacer) -> bool:
        """Move one whole call of credit to ``to`` when it has none (its quota is 0): this
        pacer's credit may go below zero, and it pays the call back from what it accrues, so
        the two together never spend more than their budgets. True when lent."""
        if to.quota() > 0:
            return False
        self.credit -= 1.0
        to.credit += 1.0
        return True
