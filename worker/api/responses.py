"""HTTP answers that are not a success, turned into the exception tree of worker/errors.py.

Pure functions of (status, headers, body): no I/O, so every mapping is unit-tested exactly.

The API documents two error shapes (api-contract.md, "Errors"), and both are parsed:
the FAQ's ``{"error": {"message": ...}}`` and the OpenAPI HttpError
``{"code": ..., "message": ..., "validation_errors": {"field": "reason"}}``.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

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
from worker.logs import redact_text

#: Longest error message kept from a body: enough for any real message, not a whole HTML page.
MESSAGE_MAX = 500

_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class MalformedCreateResponse(MalformedResponse, Ambiguous):
    """A create answered 2xx with a body that is not a PaymentRequest.

    The server said "success", so the payment request probably exists, but its id is unknown:
    this is both a MalformedResponse and an Ambiguous outcome, and a caller that handles
    ``Ambiguous`` for creates (never re-post blindly) does the safe thing without knowing this
    class.
    """


@dataclass(frozen=True)
class ErrorBody:
    """What an error body said: the message, the API's code, and per-field reasons."""

    message: str | None = None
    code: str | None = None
    validation_errors: Mapping[str, str] = field(default_factory=dict)


def _clean(text: str) -> str:
    """One line, without control characters or known secrets, at most MESSAGE_MAX characters.

    Redacted because a server may echo what it was sent (a token, a form body) in its error,
    and this text ends up in exception messages.
    """
    text = redact_text(_CONTROL.sub(" ", text).strip())
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 1] + "…"


def _as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _clean(value) or None
    if isinstance(value, list):
        return _clean("; ".join(str(v) for v in value)) or None
    return _clean(json.dumps(value, default=str)) or None


def _field_errors(value: object) -> dict[str, str]:
    """``{"field": "reason"}`` (reasons may also be lists); anything else gives nothing."""
    if not isinstance(value, dict):
        return {}
    errors: dict[str, str] = {}
    for key, reason in value.items():
        errors[str(key)] = _as_text(reason) or ""
    return errors


def parse_error_body(body: bytes) -> ErrorBody:
    """Read either documented error shape from ``body``; tolerate anything else.

    A JSON body of neither shape, or a non-JSON body, gives its text (cleaned, truncated) as the
    message, so the operator still sees what the server said.
    """
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return ErrorBody(message=_as_text(text))
    if not isinstance(data, dict):
        return ErrorBody(message=_as_text(text))
    message: str | None = None
    code: str | None = None
    validation: dict[str, str] = {}
    nested = data.get("error")
    if isinstance(nested, dict):  # FAQ shape: {"error": {"message": ...}}
        message = _as_text(nested.get("message"))
        code = _as_text(nested.get("code"))
        validation = _field_errors(nested.get("validation_errors"))
    elif isinstance(nested, str):  # a plain {"error": "..."} seen from many APIs
        message = _as_text(nested)
    # OpenAPI HttpError shape: {"code", "message", "validation_errors"}; fills what is missing.
    message = message or _as_text(data.get("message"))
    code = code or _as_text(data.get("code"))
    validation = validation or _field_errors(data.get("validation_errors"))
    if message is None and not validation and code is None:
        message = _as_text(text)
    return ErrorBody(message=message, code=code, validation_errors=validation)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date.

    None when the header is absent or unparseable; a date in the past gives 0.0.
    """
    if value is None:
        return None
    match = _SECONDS.match(value)
    if match:
        seconds = float(match.group(1))
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read as UTC
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    account: str,
    endpoint: str,
) -> ApiError:
    """The exception for a non-2xx answer ``status`` to a call on ``endpoint``.

    =========  ========================================================================
    400, 422   RejectedInput (message, code, validation_errors from either body shape)
    401        Unauthorized (the client renews the token once before raising it);
               on the token call: CredentialsRefused
    403        token call: CredentialsRefused; elsewhere Unauthorized with status 403
    404        NotFound
    429        RateLimited, retry_after from Retry-After (seconds or HTTP date)
    5xx        ServerError, retry_after from Retry-After when sent (503)
    other      ApiError (not retry-safe: an unknown answer is not assumed harmless)
    =========  ========================================================================

    ``headers`` must be case-insensitive (requests' headers are).
    """
    parsed = parse_error_body(body)
    reason = parsed.message or f"HTTP {status}"
    code = parsed.code
    if status in (400, 422):
        return RejectedInput(
            f"the API rejected the request: {reason}",
            validation_errors=parsed.validation_errors,
            status=status,
            code=code,
            account=account,
            endpoint=endpoint,
        )
    if endpoint == "token" and status in (401, 403):
        # The contract answers 403 to wrong credentials; 401 is the usual OAuth answer for the
        # same thing, and no token was involved, so renewing cannot help either.
        return CredentialsRefused(
            f"the API refused the account's client credentials: {reason}",
            status=status,
            code=code,
            account=account,
            endpoint=endpoint,
        )
    if status in (401, 403):
        return Unauthorized(
            f"the API refused the access token: {reason}",
            status=status,
            code=code,
            account=account,
            endpoint=endpoint,
        )
    if status == 404:
        return NotFound(
            f"not found: {reason}", status=status, code=code, account=account, endpoint=endpoint
        )
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if status == 429:
        return RateLimited(
            f"rate limited: {reason}",
            status=status,
            code=code,
            retry_after=retry_after,
            account=account,
            endpoint=endpoint,
        )
    if 500 <= status <= 599:
        return ServerError(
            f"server error: {reason}",
            status=status,
            code=code,
            retry_after=retry_after,
            account=account,
            endpoint=endpoint,
        )
    return ApiError(
        f"unexpected answer: {reason}", status=status, code=code, account=account, endpoint=endpoint
    )


def malformed(
    problem: str, *, account: str, endpoint: str, status: int | None
) -> MalformedResponse:
    """The error for a 2xx whose body is unusable; for a create it is also Ambiguous."""
    cls = MalformedCreateResponse if endpoint == "create" else MalformedResponse
    return cls(f"malformed answer: {problem}", account=account, endpoint=endpoint, status=status)
