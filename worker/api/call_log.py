"""One metric sample and one ``api.request`` log event per API call that was sent (or whose
sending failed): the record every exchange of the client leaves."""

from __future__ import annotations

import time
from typing import Any

import structlog

from worker import metrics
from worker.errors import ApiError, MalformedResponse

log = structlog.get_logger("worker.api")


def _outcome(status: int | None, error: ApiError | None) -> str:
    """The metric/log label of an exchange: the status code, or the error class."""
    if error is None:
        return str(status)
    if isinstance(error, MalformedResponse):
        return "MalformedResponse"  # one label for both the create and the plain kind
    return error.outcome


def record_call(
    account: str,
    endpoint: str,
    method: str,
    status: int | None,
    error: ApiError | None,
    started: float,
    waited: float,
    attempt: int,
) -> None:
    """Count, time and log one call that was sent (or whose sending failed)."""
    seconds = time.perf_counter() - started
    outcome = _outcome(status, error)
    metrics.record_api_call(account, endpoint, outcome, seconds)
    fields: dict[str, Any] = {
        "account": account,
        "endpoint": endpoint,
        "method": method,
        "status": status,
        "outcome": outcome,
        "latency_ms": round(seconds * 1000, 1),
        "limiter_wait_ms": round(waited * 1000, 1),
        "attempt": attempt,
    }
    if error is None:
        log.info("api.request", **fields)
    else:
        fields["error"] = type(error).__name__
        fields["reason"] = error.message
        if error.retry_after is not None:
            fields["retry_after"] = error.retry_after
        log.warning("api.request", **fields)
