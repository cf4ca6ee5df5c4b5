"""A payment's life in the sandbox: drawn once at creation, read lazily from the clock.

Each payment gets its own random generator seeded with (seed, reset generation, creation
index), so its outcome and timings depend only on ``--seed`` and the creation order, never on
faults, threads or how often it is polled. Its status at time t is a pure function of the plan.
"""

from __future__ import annotations

import dataclasses
import random

PENDING = "pending"
TERMINAL = frozenset({"paid", "expired", "cancelled"})


@dataclasses.dataclass(frozen=True)
class LifecycleSettings:
    """How outcomes and their timing are drawn (see the CLI's lifecycle options)."""

    pay_after: tuple[float, float]  # seconds from creation to the outcome
    outcomes: dict[str, float]  # outcome -> probability (sums to 1)
    stay_pending: float  # share that stays pending until expire_after, then expires
    expire_after: float
    unknown_status: float  # share that passes through an undocumented status first
    unknown_status_name: str
    # (share, min, max): that share of the payers (those not staying pending) reach their
    # outcome uniformly in [min, max] s instead of ``pay_after``: a long tail (issue 11).
    pay_after_tail: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The drawn future of one payment."""

    outcome: str  # paid / expired / cancelled
    terminal_at: float  # epoch seconds at which the status becomes ``outcome``
    unknown_from: float | None  # epoch seconds from which the undocumented status shows

    def status(self, now: float, unknown_name: str) -> str:
        """The status at ``now``: pending, then (maybe) the unknown status, then the outcome."""
        if now >= self.terminal_at:
            return self.outcome
        if self.unknown_from is not None and now >= self.unknown_from:
            return unknown_name
        return PENDING


def draw_plan(
    settings: LifecycleSettings, *, seed: int, generation: int, index: int, created_at: float
) -> Plan:
    """The plan of the ``index``-th payment created since start (or the last reset).

    Always draws the same five numbers, so one payment's draw never shifts another's, and a
    payment's draw with no tail is what it was before the tail existed (the fifth number is
    drawn last). The undocumented status, when drawn, shows from halfway between creation and
    the outcome.
    """
    rng = random.Random(f"paypoll-sandbox/{seed}/{generation}/{index}")
    stays, pick, delay, unknown = rng.random(), rng.random(), rng.random(), rng.random()
    tail = rng.random()
    if stays < settings.stay_pending:
        outcome, after = "expired", settings.expire_after
    else:
        outcome = _weighted(settings.outcomes, pick)
        tail_share, tail_low, tail_high = settings.pay_after_tail
        low, high = (tail_low, tail_high) if tail < tail_share else settings.pay_after
        after = low + (high - low) * delay
    terminal_at = created_at + after
    unknown_from = None
    if unknown < settings.unknown_status:
        unknown_from = created_at + after / 2.0
    return Plan(outcome=outcome, terminal_at=terminal_at, unknown_from=unknown_from)


def _weighted(weights: dict[str, float], pick: float) -> str:
    """The outcome whose cumulative weight first exceeds ``pick`` (in [0, 1))."""
    cumulative = 0.0
    last = "paid"
    for name, weight in weights.items():
        if weight <= 0:
            continue
        cumulative += weight
        last = name
        if pick < cumulative:
            return name
    return last  # rounding: pick was just under 1.0
