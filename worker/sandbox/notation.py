"""Parsers for the sandbox's option notations (command line and ``POST /_admin/faults``).

- a range ``MIN:MAX`` (or a single number, meaning ``MIN=MAX``);
- a tail ``SHARE:MIN:MAX`` (a share in [0, 1] and a range);
- a share in [0, 1];
- a per-endpoint value: either one value for every endpoint, or ``token=V,create=V,get=V``
  (endpoints not named get the zero value, i.e. no fault);
- outcomes ``paid=0.8,expired=0.1,cancelled=0.1`` (weights, normalised to sum 1);
- a client ``ID:SECRET``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

V = TypeVar("V")

# The API's endpoints, as named in faults and in paypoll's metrics.
ENDPOINTS = ("token", "create", "get")
OUTCOMES = ("paid", "expired", "cancelled")


def check_share(value: float) -> float:
    """``value`` if it is a share in [0, 1]; ValueError otherwise."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a share must be within [0, 1], got {value}")
    return value


def parse_share(text: str) -> float:
    """A share in [0, 1] from text."""
    return check_share(float(text))


def parse_range(text: str) -> tuple[float, float]:
    """``MIN:MAX`` (or one number) as a (min, max) pair with 0 <= min <= max."""
    parts = text.split(":")
    if len(parts) == 1:
        low = high = float(parts[0])
    elif len(parts) == 2:
        low, high = float(parts[0]), float(parts[1])
    else:
        raise ValueError(f"expected MIN:MAX, got {text!r}")
    if not 0 <= low <= high:
        raise ValueError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return (low, high)


def parse_tail(text: str) -> tuple[float, float, float]:
    """``SHARE:MIN:MAX`` as (share, min, max): a share in [0, 1] and a range as parse_range."""
    share_text, sep, range_text = text.partition(":")
    if not sep or ":" not in range_text:
        raise ValueError(f"expected SHARE:MIN:MAX, got {text!r}")
    low, high = parse_range(range_text)
    return (parse_share(share_text), low, high)


def parse_client(text: str) -> tuple[str, str]:
    """``ID:SECRET`` as (client_id, secret). The secret is never echoed in the error."""
    client_id, sep, secret = text.partition(":")
    if not sep or not client_id or not secret:
        raise ValueError("expected ID:SECRET with both parts non-empty")
    return client_id, secret


def parse_outcomes(text: str) -> dict[str, float]:
    """``paid=0.8,expired=0.1,cancelled=0.1`` as weights normalised to sum 1."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in OUTCOMES:
            raise ValueError(f"expected NAME=WEIGHT with NAME in {OUTCOMES}, got {item!r}")
        weights[name] = float(value)
        if weights[name] < 0:
            raise ValueError("outcome weights must be >= 0")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("at least one outcome weight must be > 0")
    return {name: weights.get(name, 0.0) / total for name in OUTCOMES}


def parse_per_endpoint(text: str, parse: Callable[[str], V], zero: V) -> dict[str, V]:
    """One value for every endpoint, or ``endpoint=value,...`` (others get ``zero``)."""
    if "=" not in text:
        value = parse(text)
        return dict.fromkeys(ENDPOINTS, value)
    result = dict.fromkeys(ENDPOINTS, zero)
    for item in text.split(","):
        name, _, value_text = item.strip().partition("=")
        if name not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {name!r}; expected one of {ENDPOINTS}")
        result[name] = parse(value_text)
    return result
