"""Pure parts of the API client: error bodies, Retry-After, status mapping, PaymentRequest."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from requests.structures import CaseInsensitiveDict

from worker.api.models import BadPayload, PaymentRequest, parse_payment
from worker.api.responses import (
    MESSAGE_MAX,
    MalformedCreateResponse,
    error_for_status,
    malformed,
    parse_error_body,
    parse_retry_after,
)
from worker.errors import (
    Ambiguous,
    ApiError,
    CredentialsRefused,
    MalformedResponse,
    NotFound,
    RateLimited,
    RejectedInput,
    ServerError,
    Unauthorized,
)
from worker.logs import register_secret

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


# --- error bodies -------------------------------------------------------------------------------


def test_faq_shape() -> None:
    parsed = parse_error_body(_json({"error": {"message": "amount is required"}}))
    assert parsed.message == "amount is required"
    assert parsed.code is None
    assert parsed.validation_errors == {}


def test_openapi_shape() -> None:
    body = {
        "code": "validation_error",
        "message": "Invalid fields",
        "validation_errors": {"amount": "must be positive", "currency": ["bad", "unknown"]},
    }
    parsed = parse_error_body(_json(body))
    assert parsed.message == "Invalid fields"
    assert parsed.code == "validation_error"
    assert parsed.validation_errors == {"amount": "must be positive", "currency": "bad; unknown"}


def test_both_shapes_at_once_prefer_the_nested_message() -> None:
    body = {
        "error": {"message": "nested", "code": "c1"},
        "message": "top",
        "validation_errors": {"f": "r"},
    }
    parsed = parse_error_body(_json(body))
    assert (parsed.message, parsed.code, dict(parsed.validation_errors)) == (
        "nested",
        "c1",
        {"f": "r"},
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html><body>Bad Gateway</body></html>", "<html><body>Bad Gateway</body></html>"),
        (b"", None),
        (b"\xff\xfe not utf-8", "\ufffd\ufffd not utf-8"),
        (b"[1, 2]", "[1, 2]"),
        (b'{"error": "plain string"}', "plain string"),
        (b'{"unexpected": 1}', '{"unexpected": 1}'),
        (b"line1\nline2\r\n", "line1 line2"),
    ],
)
def test_odd_bodies_are_tolerated(body: bytes, message: str | None) -> None:
    assert parse_error_body(body).message == message


def test_long_message_is_truncated() -> None:
    parsed = parse_error_body(_json({"message": "x" * 10_000}))
    assert parsed.message is not None
    assert len(parsed.message) == MESSAGE_MAX
    assert parsed.message.endswith("…")


# --- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        (" 0 ", 0.0),
        ("1.5", 1.5),
        ("120", 120.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-1", None),
        ("inf", None),
        ("NaN", None),
        ("Wed, 99 Foo 2026 00:00:00 GMT", None),
    ],
)
def test_retry_after_seconds_and_garbage(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == expected


def test_retry_after_http_date() -> None:
    header = format_datetime(NOW + timedelta(seconds=7), usegmt=True)
    assert parse_retry_after(header, now=NOW) == pytest.approx(7.0)


def test_retry_after_date_in_the_past_is_zero() -> None:
    header = format_datetime(NOW - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(header, now=NOW) == 0.0


def test_retry_after_date_without_zone_is_utc() -> None:
    assert parse_retry_after("Fri, 02 Jan 2026 03:04:15", now=NOW) == pytest.approx(10.0)


# --- status mapping --------------------------------------------------------------------------


def _err(status: int, body: object = None, endpoint: str = "create", **headers: str) -> ApiError:
    raw = b"" if body is None else _json(body)
    return error_for_status(
        status, CaseInsensitiveDict(headers), raw, account="acme", endpoint=endpoint
    )


@pytest.mark.parametrize("status", [400, 422])
def test_rejected_input_keeps_message_and_fields(status: int) -> None:
    exc = _err(status, {"code": "bad", "message": "nope", "validation_errors": {"amount": "<0"}})
    assert isinstance(exc, RejectedInput)
    assert not exc.retry_safe
    assert exc.validation_errors == {"amount": "<0"}
    assert (exc.status, exc.code, exc.account, exc.endpoint) == (status, "bad", "acme", "create")
    assert "nope" in str(exc)


@pytest.mark.parametrize(
    ("status", "endpoint", "cls"),
    [
        (404, "get", NotFound),
        (401, "get", Unauthorized),
        (403, "get", Unauthorized),
        (403, "token", CredentialsRefused),
        (401, "token", CredentialsRefused),
        (500, "get", ServerError),
        (502, "create", ServerError),
        (418, "get", ApiError),
    ],
)
def test_status_classes(status: int, endpoint: str, cls: type[ApiError]) -> None:
    exc = _err(status, {"error": {"message": "m"}}, endpoint=endpoint)
    assert type(exc) is cls
    assert exc.status == status
    assert exc.endpoint == endpoint


def test_429_reads_retry_after_header_case_insensitively() -> None:
    exc = _err(429, None, **{"retry-after": "2"})
    assert isinstance(exc, RateLimited)
    assert exc.retry_safe
    assert exc.retry_after == 2.0
    assert exc.outcome == "429"


def test_429_without_retry_after() -> None:
    exc = _err(429)
    assert isinstance(exc, RateLimited)
    assert exc.retry_after is None


def test_503_retry_after() -> None:
    exc = _err(503, None, **{"Retry-After": "4"})
    assert isinstance(exc, ServerError)
    assert exc.retry_after == 4.0
    assert exc.retry_safe


def test_malformed_create_is_also_ambiguous() -> None:
    create = malformed("x", account="acme", endpoint="create", status=200)
    get = malformed("x", account="acme", endpoint="get", status=200)
    assert isinstance(create, MalformedCreateResponse)
    assert isinstance(create, Ambiguous)
    assert isinstance(create, MalformedResponse)
    assert not create.retry_safe
    assert isinstance(get, MalformedResponse)
    assert not isinstance(get, Ambiguous)


# --- PaymentRequest --------------------------------------------------------------------------


def test_payment_keeps_unknown_fields_and_status() -> None:
    payment = parse_payment(
        {
            "id": "pr_1",
            "status": "processing",
            "reference_id": None,
            "url": "https://pay/1",
            "redirect_url": "https://back",
            "amount": "10",
            "new_field": {"x": 1},
        }
    )
    assert payment == PaymentRequest(
        id="pr_1",
        status="processing",
        reference_id=None,
        url="https://pay/1",
        redirect_url="https://back",
        extra={"amount": "10", "new_field": {"x": 1}},
    )
    assert not payment.is_known_status
    assert not payment.is_terminal


@pytest.mark.parametrize(
    ("status", "terminal"),
    [("paid", True), ("expired", True), ("cancelled", True), ("pending", False)],
)
def test_terminal_statuses(status: str, terminal: bool) -> None:
    payment = parse_payment({"id": "p", "status": status})
    assert payment.is_terminal is terminal
    assert payment.is_known_status


@pytest.mark.parametrize(
    "data",
    [
        [],
        "text",
        None,
        {"status": "paid"},
        {"id": "", "status": "paid"},
        {"id": 12, "status": "paid"},
        {"id": "p"},
        {"id": "p", "status": 3},
        {"id": "p", "status": "paid", "url": 5},
        {"id": "p", "status": "paid", "reference_id": ["x"]},
    ],
)
def test_payment_rejects_wrong_shapes(data: object) -> None:
    with pytest.raises(BadPayload):
        parse_payment(data)


def test_secrets_echoed_by_the_server_are_redacted() -> None:
    register_secret("echoed-token-abcdef123")
    parsed = parse_error_body(
        _json({"message": "bad token echoed-token-abcdef123 in Authorization: Bearer xyz"})
    )
    assert parsed.message == "bad token [REDACTED] in Authorization: Bearer [REDACTED]"
