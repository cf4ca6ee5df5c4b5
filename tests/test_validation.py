"""Submit validation: every refusal names the field and the reason; nothing is recorded."""

from __future__ import annotations

from decimal import Decimal

import pytest

from worker.errors import UnknownAccount, ValidationError
from worker.validation import validate_payment

ACCOUNTS = {"acme": object()}
GOOD = {
    "account": "acme",
    "amount": "12.50",
    "currency": "USD",
    "redirect_url": "https://shop.test/thanks",
    "reference_id": "order-1",
}


def check(**changes: object) -> ValidationError:
    with pytest.raises(ValidationError) as err:
        validate_payment(accounts=ACCOUNTS, **{**GOOD, **changes})
    return err.value


def test_a_good_payment_is_normalised() -> None:
    spec = validate_payment(accounts=ACCOUNTS, **{**GOOD, "currency": "usd", "amount": 7})
    assert (spec.amount, spec.currency, spec.reference_id) == ("7", "USD", "order-1")
    generated = validate_payment(accounts=ACCOUNTS, **{**GOOD, "reference_id": None})
    assert generated.reference_id.startswith("pp-") and len(generated.reference_id) == 35
    assert validate_payment(accounts=ACCOUNTS, **{**GOOD, "amount": Decimal("1.5")}).amount == "1.5"


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"amount": "0"}, "amount", "greater than 0"),
        ({"amount": "-5"}, "amount", "positive decimal"),
        ({"amount": "1.234"}, "amount", "at most 2 decimals"),
        ({"amount": "ten"}, "amount", "positive decimal"),
        ({"amount": 1.5}, "amount", "floats lose cents"),
        ({"amount": "2000000000"}, "amount", "at most"),
        ({"currency": "EUR"}, "currency", "allowed: USD"),
        ({"redirect_url": "http://shop.test"}, "redirect_url", "https://"),
        ({"redirect_url": "/thanks"}, "redirect_url", "https://"),
        ({"redirect_url": ""}, "redirect_url", "required"),
        ({"redirect_url": "https://shop.test/a b"}, "redirect_url", "spaces"),
        ({"reference_id": "x" * 129}, "reference_id", "longer than 128"),
        ({"reference_id": "a\nb"}, "reference_id", "spaces or control"),
        ({"account": ""}, "account", "required"),
    ],
)
def test_each_bad_field_is_named(changes: dict[str, object], field: str, words: str) -> None:
    error = check(**changes)
    assert error.field == field
    assert words in error.reason
    assert field in str(error)


def test_unknown_account() -> None:
    with pytest.raises(UnknownAccount) as err:
        validate_payment(accounts=ACCOUNTS, **{**GOOD, "account": "nobody"})
    assert err.value.field == "account" and "nobody" in str(err.value)


def test_every_bad_field_is_named_at_once() -> None:
    # Issue 15: `-1,EUR,ftp://x` said only "amount"; fixing one field at a time took three tries.
    error = check(amount="-1", currency="EUR", redirect_url="ftp://x", reference_id="a b")
    assert [field for field, _ in error.problems] == [
        "amount",
        "currency",
        "redirect_url",
        "reference_id",
    ]
    assert (error.field, error.reason) == error.problems[0]
    reasons = dict(error.problems)
    assert "positive decimal" in reasons["amount"] and "allowed: USD" in reasons["currency"]
    assert "https://" in reasons["redirect_url"] and "spaces" in reasons["reference_id"]
    assert str(error).count(";") == 3 and all(field in str(error) for field in reasons)


def test_an_unknown_account_is_listed_with_the_other_problems() -> None:
    error = check(account="nobody", amount="0")
    assert [field for field, _ in error.problems] == ["account", "amount"]
    assert "nobody" in dict(error.problems)["account"]
    assert check(amount="0").problems == (("amount", "must be greater than 0"),)
