"""Validation of submitted payments: every check names the field and the reason.

Producers (worker/producer.py, the CLI, file import) call :func:`validate_payment` before
anything is recorded, so nothing invalid ever reaches the store or the API.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from worker import defaults
from worker.errors import UnknownAccount, ValidationError
from worker.store import PaymentSpec

_AMOUNT = re.compile(r"^[0-9]+(\.[0-9]{1,2})?$")
MAX_AMOUNT = Decimal("1000000000")  # far above any real single charge; catches unit mistakes
MAX_URL_LENGTH = 2048  # what browsers and most servers accept


def new_reference_id() -> str:
    """A fresh reference_id for a payment submitted without one."""
    return f"pp-{uuid.uuid4().hex}"


def validate_amount(value: Any) -> str:
    """The amount as the API wants it: a positive decimal string with at most 2 decimals."""
    if isinstance(value, bool | float):
        raise ValidationError(
            "amount", "must be a decimal string such as '100' or '12.50' (floats lose cents)"
        )
    if isinstance(value, int | Decimal):
        value = str(value)
    if not isinstance(value, str):
        raise ValidationError("amount", f"must be a decimal string, not {type(value).__name__}")
    text = value.strip()
    if not _AMOUNT.match(text):
        raise ValidationError(
            "amount", f"{value!r} is not a positive decimal with at most 2 decimals"
        )
    try:
        amount = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex already guarantees a number
        raise ValidationError("amount", f"{value!r} is not a number") from None
    if amount <= 0:
        raise ValidationError("amount", "must be greater than 0")
    if amount > MAX_AMOUNT:
        raise ValidationError("amount", f"must be at most {MAX_AMOUNT}")
    return text


def validate_currency(value: Any) -> str:
    """The currency code, upper-cased; only the API's documented codes pass."""
    if not isinstance(value, str) or value.strip().upper() not in defaults.CURRENCIES:
        allowed = ", ".join(defaults.CURRENCIES)
        raise ValidationError("currency", f"{value!r} is not supported (allowed: {allowed})")
    return value.strip().upper()


def validate_redirect_url(value: Any) -> str:
    """An absolute https URL where the payer returns after paying."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError("redirect_url", "is required: an absolute https:// URL")
    text = value.strip()
    if len(text) > MAX_URL_LENGTH:
        raise ValidationError("redirect_url", f"is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() for c in text) or any(ord(c) < 32 for c in text):
        raise ValidationError("redirect_url", "must not contain spaces or control characters")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ValidationError("redirect_url", f"is not a valid URL ({exc})") from None
    if parts.scheme != "https" or not parts.hostname:
        raise ValidationError("redirect_url", f"{text!r} is not an absolute https:// URL")
    return text


def validate_reference_id(value: Any) -> str:
    """The caller's reference: 1 to REFERENCE_ID_MAX printable characters, no spaces."""
    if not isinstance(value, str):
        raise ValidationError("reference_id", f"must be a string, not {type(value).__name__}")
    if not value:
        raise ValidationError("reference_id", "must not be empty (omit it to have one generated)")
    if len(value) > defaults.REFERENCE_ID_MAX:
        raise ValidationError(
            "reference_id", f"is longer than {defaults.REFERENCE_ID_MAX} characters"
        )
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValidationError("reference_id", "must not contain spaces or control characters")
    return value


def validate_payment(
    *,
    account: Any,
    amount: Any,
    currency: Any = "USD",
    redirect_url: Any,
    reference_id: Any = None,
    accounts: Mapping[str, object],
) -> PaymentSpec:
    """Check every field of a payment and return it normalised, or raise one ValidationError
    listing every bad field with its reason (``problems``; ``field`` is the first of them).
    ``accounts`` are the configured account aliases."""
    problems: list[ValidationError] = []

    def checked(check: Callable[[Any], str], value: Any) -> str:
        try:
            return check(value)
        except ValidationError as exc:
            problems.append(exc)
            return ""

    checked(lambda value: validate_account(value, accounts), account)
    spec = PaymentSpec(
        account=account,
        amount=checked(validate_amount, amount),
        currency=checked(validate_currency, currency),
        redirect_url=checked(validate_redirect_url, redirect_url),
        reference_id=(
            checked(validate_reference_id, reference_id)
            if reference_id not in (None, "")
            else new_reference_id()
        ),
    )
    if problems:
        raise ValidationError.combine(problems)
    return spec


def validate_account(value: Any, accounts: Mapping[str, object]) -> str:
    """The alias of a configured account (UnknownAccount when it is not one)."""
    if not isinstance(value, str) or not value:
        raise ValidationError("account", "is required: the alias of a configured account")
    if value not in accounts:
        raise UnknownAccount(value)
    return value
