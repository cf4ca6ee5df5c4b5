"""Validation of a create body, as the API documents it (api-contract.md, "Payment requests").

Which status for what:
- 400: the body is not JSON, or not a JSON object; a required field (amount, currency,
  redirect_url) is missing; a field is not a string; amount is not a positive decimal string;
  currency is not USD; redirect_url is not an absolute http(s) URL; reference_id is not a
  string (null is allowed).
- 422: a well-formed, valid-looking request that is refused on its meaning: amount above the
  sandbox's ``--max-amount``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from decimal import Decimal, InvalidOperation
from urllib.parse import urlsplit

from worker.sandbox.answers import ApiError

REQUIRED = ("amount", "currency", "redirect_url")
CURRENCIES = ("USD",)
_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?$")


@dataclasses.dataclass(frozen=True)
class CreateRequest:
    """A valid create body."""

    amount: str
    currency: str
    redirect_url: str
    reference_id: str | None


def parse_create(body: bytes, *, max_amount: float) -> CreateRequest:
    """The create request in ``body``, or ApiError (400 or 422) saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "Request body must be a JSON object")
    errors: dict[str, str] = {}
    missing = [field for field in REQUIRED if data.get(field) is None]
    for field in missing:
        errors[field] = "is required"
    for field in (*REQUIRED, "reference_id"):
        value = data.get(field)
        if value is not None and not isinstance(value, str):
            errors[field] = "must be a string"
    amount = data.get("amount")
    if isinstance(amount, str) and not _positive_decimal(amount):
        errors["amount"] = 'must be a positive decimal string, e.g. "100" or "12.50"'
    currency = data.get("currency")
    if isinstance(currency, str) and currency not in CURRENCIES:
        errors["currency"] = f"must be one of {', '.join(CURRENCIES)}"
    redirect_url = data.get("redirect_url")
    if isinstance(redirect_url, str) and not _absolute_url(redirect_url):
        errors["redirect_url"] = "must be an absolute http(s) URL"
    if errors:
        if missing:
            message = f"Missing required fields: {', '.join(missing)}"
        else:
            message = "Invalid fields: " + "; ".join(f"{k} {v}" for k, v in errors.items())
        raise ApiError(400, "validation_error", message, errors)
    # No errors: the three required fields are present and are strings.
    assert isinstance(amount, str)
    assert isinstance(currency, str)
    assert isinstance(redirect_url, str)
    if Decimal(amount) > Decimal(str(max_amount)):
        raise ApiError(
            422,
            "amount_too_large",
            f"amount exceeds the maximum of {max_amount:g} per payment request",
            {"amount": f"must be at most {max_amount:g}"},
        )
    reference_id = data.get("reference_id")
    return CreateRequest(
        amount=amount,
        currency=currency,
        redirect_url=redirect_url,
        reference_id=reference_id if isinstance(reference_id, str) else None,
    )


def _positive_decimal(text: str) -> bool:
    if not _DECIMAL.match(text):
        return False
    try:
        return Decimal(text) > 0
    except InvalidOperation:
        return False


def _absolute_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in text
