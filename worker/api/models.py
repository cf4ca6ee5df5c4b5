"""What the API answers with: the PaymentRequest, its statuses, and the parser of its JSON.

The API may add fields and statuses without a version bump (api-contract.md, "Version"), so an
unknown status is passed through as a plain string and unknown fields are kept in ``extra``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PENDING = "pending"
PAID = "paid"
EXPIRED = "expired"
CANCELLED = "cancelled"

#: Statuses after which a payment request never changes again (api-contract.md).
TERMINAL_STATUSES = frozenset({PAID, EXPIRED, CANCELLED})
#: Every status the contract documents; anything else is new and is passed through as is.
KNOWN_STATUSES = frozenset({PENDING}) | TERMINAL_STATUSES

_REQUIRED = ("id", "status")
_OPTIONAL = ("reference_id", "url", "redirect_url")


@dataclass(frozen=True)
class PaymentRequest:
    """One payment request as the API describes it.

    ``status`` is any string the API sent (see ``is_terminal`` / ``is_known_status``);
    ``extra`` holds the fields the contract does not name, untouched.
    """

    id: str
    status: str
    reference_id: str | None = None
    url: str | None = None
    redirect_url: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        """True when the status is paid, expired or cancelled."""
        return self.status in TERMINAL_STATUSES

    @property
    def is_known_status(self) -> bool:
        """False for a status the contract does not document (to count and log it)."""
        return self.status in KNOWN_STATUSES


class BadPayload(ValueError):
    """A 2xx body that is not a PaymentRequest; the message says what is wrong (no values)."""


def parse_payment(data: object) -> PaymentRequest:
    """A PaymentRequest from decoded JSON, or BadPayload naming the first problem found.

    ``id`` and ``status`` must be non-empty strings; ``reference_id``, ``url`` and
    ``redirect_url`` may be absent or null but otherwise must be strings.
    """
    if not isinstance(data, dict):
        raise BadPayload(f"expected a JSON object, got {type(data).__name__}")
    for name in _REQUIRED:
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise BadPayload(f"field {name!r} must be a non-empty string")
    for name in _OPTIONAL:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise BadPayload(f"field {name!r} must be a string or null")
    known = set(_REQUIRED) | set(_OPTIONAL)
    return PaymentRequest(
        id=data["id"],
        status=data["status"],
        reference_id=data.get("reference_id"),
        url=data.get("url"),
        redirect_url=data.get("redirect_url"),
        extra={k: v for k, v in data.items() if k not in known},
    )
