"""Fault injection: which faults are on, and the per-request draw of which one happens.

Faults are drawn only for requests that passed the rate limit and authentication (a 429 is a
429, a 401 is a 401), in this order, at most one per request:
1. ``error``: a 5xx answered WITHOUT processing (nothing is created, no poll is counted);
2. ``drop`` (create only): the payment IS created, then the connection is closed with no answer;
3. ``malformed``: the request is processed, and a 200 answer gets a malformed body.
Latency is added to every API answer (429s included: it stands for the network and the server).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any

from worker.sandbox.notation import (
    ENDPOINTS,
    check_share,
    parse_per_endpoint,
    parse_range,
    parse_share,
)

# Bodies a malformed 200 may carry: not JSON at all, JSON cut short, or JSON without the
# fields a PaymentRequest / token answer must have.
MALFORMED_KINDS = ("html", "truncated", "missing_fields")
ERROR_STATUSES = (500, 502, 503)


def _zero_latency() -> dict[str, tuple[float, float]]:
    return dict.fromkeys(ENDPOINTS, (0.0, 0.0))


def _zero_share() -> dict[str, float]:
    return dict.fromkeys(ENDPOINTS, 0.0)


@dataclasses.dataclass(frozen=True)
class FaultSettings:
    """The fault settings in force. Replaced as a whole at run time (``with_changes``)."""

    latency_ms: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=_zero_latency)
    error_rate: Mapping[str, float] = dataclasses.field(default_factory=_zero_share)
    error_statuses: tuple[int, ...] = ERROR_STATUSES
    error_retry_after: float | None = None  # seconds sent as Retry-After on an injected 503
    drop_create_rate: float = 0.0
    malformed_rate: Mapping[str, float] = dataclasses.field(default_factory=_zero_share)

    def __post_init__(self) -> None:
        for mapping in (self.error_rate, self.malformed_rate):
            for share in mapping.values():
                check_share(share)
        check_share(self.drop_create_rate)
        if not self.error_statuses or any(not 500 <= s <= 599 for s in self.error_statuses):
            raise ValueError("error statuses must be a non-empty list of 5xx codes")
        if self.error_retry_after is not None and self.error_retry_after < 0:
            raise ValueError("error retry-after must be >= 0")

    def public(self) -> dict[str, Any]:
        """The settings as JSON-able data (the shape ``with_changes`` accepts back)."""
        return {
            "latency_ms": {k: list(v) for k, v in self.latency_ms.items()},
            "error_rate": dict(self.error_rate),
            "error_statuses": list(self.error_statuses),
            "error_retry_after": self.error_retry_after,
            "drop_create_rate": self.drop_create_rate,
            "malformed_rate": dict(self.malformed_rate),
        }

    def with_changes(self, changes: Mapping[str, Any]) -> FaultSettings:
        """New settings from this one and a JSON object of changes; ValueError if invalid.

        Accepted keys: ``latency_ms`` (``"MIN:MAX"``, ``[MIN, MAX]``, a number, or an object
        per endpoint), ``error_rate`` / ``malformed_rate`` (a share, or an object per endpoint,
        or the ``get=0.2,...`` text), ``error_statuses`` (list of 5xx), ``error_retry_after``
        (seconds or null), ``drop_create_rate`` (a share). ``latency`` is an alias of
        ``latency_ms``.
        """
        unknown = set(changes) - {*self.public(), "latency"}
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        fields: dict[str, Any] = {}
        for key, value in changes.items():
            if key in ("latency", "latency_ms"):
                fields["latency_ms"] = _per_endpoint(value, _as_range, (0.0, 0.0))
            elif key in ("error_rate", "malformed_rate"):
                fields[key] = _per_endpoint(value, _as_share, 0.0)
            elif key == "drop_create_rate":
                fields[key] = _as_share(value)
            elif key == "error_statuses":
                if not isinstance(value, list):
                    raise ValueError("error_statuses must be a list of integers")
                fields[key] = tuple(int(s) for s in value)
            elif key == "error_retry_after":
                fields[key] = None if value is None else float(value)
        return dataclasses.replace(self, **fields)


def _as_share(value: Any) -> float:
    if isinstance(value, str):
        return parse_share(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a share, got {value!r}")
    return check_share(float(value))


def _as_range(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        return parse_range(value)
    if isinstance(value, list) and len(value) == 2:
        return parse_range(f"{float(value[0])}:{float(value[1])}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return parse_range(str(float(value)))
    raise ValueError(f"expected MIN:MAX, got {value!r}")


def _per_endpoint(value: Any, convert: Any, zero: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        unknown = set(value) - set(ENDPOINTS)
        if unknown:
            raise ValueError(f"unknown endpoints {sorted(unknown)}; expected {ENDPOINTS}")
        return {name: convert(value[name]) if name in value else zero for name in ENDPOINTS}
    if isinstance(value, str) and "=" in value:
        return parse_per_endpoint(value, convert, zero)
    one = convert(value)
    return dict.fromkeys(ENDPOINTS, one)


@dataclasses.dataclass(frozen=True)
class FaultDraw:
    """What happens to one request: extra latency and at most one fault."""

    latency: float = 0.0  # seconds to sleep before answering
    error_status: int | None = None  # answer this 5xx without processing
    drop: bool = False  # create only: process, then close the connection with no answer
    malformed: str | None = None  # one of MALFORMED_KINDS, for a 200 answer

    @property
    def kind(self) -> str | None:
        """``error``, ``drop``, ``malformed`` or None: the name counted in the stats."""
        if self.error_status is not None:
            return "error"
        if self.drop:
            return "drop"
        if self.malformed is not None:
            return "malformed"
        return None


NO_FAULT = FaultDraw()


def draw_faults(settings: FaultSettings, endpoint: str, rng: random.Random) -> FaultDraw:
    """Draw the latency and fault of one request to ``endpoint`` (``token``/``create``/``get``).

    Consumes random numbers only for the faults that are switched on, so a sandbox without
    faults draws nothing (and its lifecycle draws do not depend on fault settings anyway).
    """
    low, high = settings.latency_ms[endpoint]
    latency = (low if high == low else rng.uniform(low, high)) / 1000.0
    error_rate = settings.error_rate[endpoint]
    if error_rate > 0 and rng.random() < error_rate:
        return FaultDraw(latency=latency, error_status=rng.choice(settings.error_statuses))
    drop_rate = settings.drop_create_rate if endpoint == "create" else 0.0
    if drop_rate > 0 and rng.random() < drop_rate:
        return FaultDraw(latency=latency, drop=True)
    malformed_rate = settings.malformed_rate[endpoint]
    if malformed_rate > 0 and rng.random() < malformed_rate:
        return FaultDraw(latency=latency, malformed=rng.choice(MALFORMED_KINDS))
    if latency == 0.0:
        return NO_FAULT
    return FaultDraw(latency=latency)
