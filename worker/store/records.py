"""The shapes of a payment: what a producer submits, and what the store records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PaymentSpec:
    """A validated payment to create (see worker.producer.validate_payment)."""

    account: str
    reference_id: str
    amount: str
    currency: str
    redirect_url: str


def _float(value: str | None) -> float | None:
    return float(value) if value else None


@dataclass(frozen=True)
class PaymentRecord:
    """A payment as stored in Redis. Times are epoch seconds on the Redis clock."""

    account: str
    reference_id: str
    state: str
    amount: str = ""
    currency: str = ""
    redirect_url: str = ""
    payment_id: str = ""
    url: str = ""
    api_status: str = ""
    attempts: int = 0
    polls: int = 0
    errors: int = 0  # consecutive failed polls, reset by an answered one
    submitted_at: float | None = None
    created_at: float | None = None
    terminal_at: float | None = None
    updated_at: float | None = None
    next_at: float | None = None
    last_error: str = ""
    phase: str = ""
    sent_at: float | None = None
    polled_at: float | None = None  # when its last answered poll was stored
    # A rate-limit slot held for the payment's next step (Redis clock), set when its step was
    # rescheduled for a far slot: the step hands it back to the limiter instead of booking one.
    slot_hold: float | None = None

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str]) -> PaymentRecord:
        """Build a record from HGETALL's answer, ignoring fields it does not know."""
        data = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        return cls(
            account=data.get("account", ""),
            reference_id=data.get("reference_id", ""),
            state=data.get("state", ""),
            amount=data.get("amount", ""),
            currency=data.get("currency", ""),
            redirect_url=data.get("redirect_url", ""),
            payment_id=data.get("payment_id", ""),
            url=data.get("url", ""),
            api_status=data.get("api_status", ""),
            attempts=int(data.get("attempts") or 0),
            polls=int(data.get("polls") or 0),
            errors=int(data.get("errors") or 0),
            submitted_at=_float(data.get("submitted_at")),
            created_at=_float(data.get("created_at")),
            terminal_at=_float(data.get("terminal_at")),
            updated_at=_float(data.get("updated_at")),
            next_at=_float(data.get("next_at")),
            last_error=data.get("last_error", ""),
            phase=data.get("phase", ""),
            sent_at=_float(data.get("sent_at")),
            polled_at=_float(data.get("polled_at")),
            slot_hold=_float(data.get("slot_hold")),
        )

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (the `paypoll status --json` line)."""
        return asdict(self)
