"""One webhook attempt: a signed POST with timeouts, and what its answer means.

2xx: delivered. 410 Gone: the receiver says the endpoint is gone for good; it is disabled
until an operator enables it again. Anything else (other 4xx, 5xx, 3xx, a timeout, a refused
or dropped connection) is retried later: the receiver may be deploying, or broken for a while.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests

from worker.webhooks.endpoints import Endpoint
from worker.webhooks.queue import QueuedWebhook
from worker.webhooks.signing import signed_headers

DELIVERED = "delivered"
GONE = "gone"
RETRY = "retry"
USER_AGENT = "paypoll-webhooks/1"


@dataclass(frozen=True)
class Attempt:
    """What one POST came to."""

    verdict: str  # DELIVERED, GONE or RETRY
    outcome: str  # the metric label: the status class (2xx, 410, 4xx, 5xx) or the error kind
    detail: str  # for logs and dead letters: status and reason, never a header or secret
    seconds: float


def _status_class(status: int) -> str:
    return "410" if status == 410 else f"{status // 100}xx"


def attempt(
    session: requests.Session,
    endpoint: Endpoint,
    webhook: QueuedWebhook,
    *,
    connect_timeout: float,
    read_timeout: float,
    now: float | None = None,
) -> Attempt:
    """POST ``webhook`` to ``endpoint``, signed for this attempt's timestamp."""
    timestamp = int(now if now is not None else time.time())
    headers = signed_headers(endpoint.key, webhook.msg_id, timestamp, webhook.body)
    headers["user-agent"] = USER_AGENT
    started = time.perf_counter()
    try:
        response = session.post(
            endpoint.url,
            data=webhook.body,
            headers=headers,
            timeout=(connect_timeout, read_timeout),
            allow_redirects=False,  # a redirect could carry the signed body elsewhere
        )
    except requests.Timeout:
        return Attempt(RETRY, "timeout", "timed out", time.perf_counter() - started)
    except requests.ConnectionError as exc:
        # The exception names host and port, not the path or query (which may hold a token).
        kind = "refused" if "refused" in str(exc).lower() else "connection"
        return Attempt(RETRY, kind, f"connection failed ({kind})", time.perf_counter() - started)
    except requests.RequestException as exc:
        return Attempt(RETRY, "error", type(exc).__name__, time.perf_counter() - started)
    took = time.perf_counter() - started
    status = response.status_code
    response.close()
    if 200 <= status < 300:
        return Attempt(DELIVERED, "2xx", str(status), took)
    verdict = GONE if status == 410 else RETRY
    return Attempt(verdict, _status_class(status), f"HTTP {status}", took)
