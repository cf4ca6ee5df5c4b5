"""How long an account's payments take to complete: a learned distribution and its hazard.

Ages (seconds since the create) are cut into fixed bins (``AGE_EDGES``). The distribution is a
weight per bin: completions the fleet observed, each spread over the interval in which it must
have happened (between the last poll that saw it pending and the poll that saw it final), plus
a prior of ``PRIOR_WEIGHT`` pseudo-completions until there is data. The prior's density falls
as 1/(age + 10 s): most payers finish within minutes, and no age is ever judged impossible, so
no pending payment's hazard is zero. The hazard is piecewise constant, one value per bin:
``h_i = -ln(S(e_i+1) / S(e_i)) / width_i``, with S the survival function at the bin edges.

Pure functions and a frozen dataclass: the Redis side is worker/polling/store.py.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Bin edges in seconds of age; the last bin runs from the last edge to infinity. Fine where
# payers finish (the first minutes), coarse where few do.
AGE_EDGES: tuple[float, ...] = (
    0, 2, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 60, 75, 90, 120, 150, 180, 240, 300, 420,
    600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 10800, 14400, 21600, 43200, 86400,
)  # fmt: skip
BINS = len(AGE_EDGES)
PRIOR_WEIGHT = 20.0  # pseudo-completions: a few dozen real ones outweigh it
PRIOR_SCALE = 10.0  # seconds: the prior's density is proportional to 1 / (age + PRIOR_SCALE)
COMPLETIONS_CAP = 1000.0  # learned weight kept: older completions fade as newer ones arrive


def bin_of(age: float) -> int:
    """The bin holding ``age`` (negative ages count as 0)."""
    return max(0, bisect.bisect_right(AGE_EDGES, age) - 1)


def bin_width(i: int) -> float:
    """Width of bin ``i`` in seconds (the last, unbounded bin takes the width of the one before)."""
    if i < BINS - 1:
        return AGE_EDGES[i + 1] - AGE_EDGES[i]
    return AGE_EDGES[-1] - AGE_EDGES[-2]


def _prior() -> tuple[float, ...]:
    """PRIOR_WEIGHT spread with density 1 / (age + PRIOR_SCALE); the unbounded bin gets what
    the last finite bin gets, so the far tail is never impossible."""
    masses = [
        math.log((AGE_EDGES[i + 1] + PRIOR_SCALE) / (AGE_EDGES[i] + PRIOR_SCALE))
        for i in range(BINS - 1)
    ]
    masses.append(masses[-1])
    total = sum(masses)
    return tuple(PRIOR_WEIGHT * m / total for m in masses)


PRIOR = _prior()


def spread(low: float, high: float, weight: float = 1.0) -> dict[int, float]:
    """One completion known to have happened at an age in [low, high], as weight per bin
    (uniform over the interval; all in one bin when the interval is empty)."""
    low, high = max(0.0, low), max(0.0, high)
    if high <= low:
        return {bin_of(high): weight}
    out: dict[int, float] = {}
    span = high - low
    for i in range(bin_of(low), bin_of(high) + 1):
        start = max(low, AGE_EDGES[i])
        end = min(high, AGE_EDGES[i + 1]) if i < BINS - 1 else high
        if end > start:
            out[i] = out.get(i, 0.0) + weight * (end - start) / span
    return out


@dataclass(frozen=True)
class CompletionModel:
    """A completion-age distribution: a weight per bin of ``AGE_EDGES`` (prior included)."""

    weights: tuple[float, ...] = PRIOR

    @classmethod
    def learned(cls, observed: Mapping[int, float]) -> CompletionModel:
        """The prior plus the ``observed`` weight per bin (bins out of range are ignored)."""
        return cls(tuple(PRIOR[i] + max(0.0, observed.get(i, 0.0)) for i in range(BINS)))

    @property
    def observed(self) -> float:
        """Learned weight in the model: completions seen, less what has faded."""
        return max(0.0, sum(self.weights) - PRIOR_WEIGHT)

    def survival(self) -> list[float]:
        """S at each bin's lower edge: the share of payments still pending at that age."""
        total = sum(self.weights)
        out, left = [], 1.0
        for w in self.weights:
            out.append(left)
            left = max(0.0, left - w / total)
        return out

    def hazards(self) -> tuple[float, ...]:
        """The completion rate (per second) of a payment still pending, in each bin."""
        survival = self.survival()
        total = sum(self.weights)
        out = []
        for i, w in enumerate(self.weights[:-1]):
            share = (w / total) / survival[i] if survival[i] > 0 else 1.0
            out.append(-math.log1p(-min(share, 1 - 1e-12)) / bin_width(i))
        out.append(out[-1])  # the unbounded bin: constant hazard beyond the last edge
        return tuple(out)

    def median(self) -> float:
        """The age by which half of the payments complete (linear within its bin)."""
        survival = self.survival()
        for i in range(BINS - 1):
            after = survival[i + 1]
            if after <= 0.5:
                before = survival[i]
                part = (before - 0.5) / (before - after) if before > after else 0.0
                return AGE_EDGES[i] + part * bin_width(i)
        return AGE_EDGES[-1]


def model_from_hash(raw: Mapping[str, str]) -> CompletionModel:
    """The model of a completions hash as stored (bin index -> weight; other fields ignored)."""
    observed: dict[int, float] = {}
    for name, value in raw.items():
        if name.isdigit():
            observed[int(name)] = float(value)
    return CompletionModel.learned(observed)


def weights_text(weights: Sequence[float]) -> str:
    """Weights as one comma-separated field (the plan hash)."""
    return ",".join(f"{w:.6g}" for w in weights)


def parse_weights(text: str) -> tuple[float, ...] | None:
    """The inverse of :func:`weights_text`; None when the text is not BINS numbers."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        return None
    return values if len(values) == BINS else None
