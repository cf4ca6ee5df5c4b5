"""The Alternative Payments API client: OAuth token cache, calls, errors, timeouts.

``ApiClient`` is what the actors use; the rest is exported for tests, tools and type hints.
"""

from __future__ import annotations

from worker.api.auth import IssuedToken, TokenCache
from worker.api.client import ApiClient
from worker.api.limiting import Limiter, UnlimitedLimiter
from worker.api.models import (
    KNOWN_STATUSES,
    TERMINAL_STATUSES,
    PaymentRequest,
    parse_payment,
)
from worker.api.responses import (
    MalformedCreateResponse,
    error_for_status,
    parse_error_body,
    parse_retry_after,
)
from worker.api.transport import new_session, process_session

__all__ = [
    "KNOWN_STATUSES",
    "TERMINAL_STATUSES",
    "ApiClient",
    "IssuedToken",
    "Limiter",
    "MalformedCreateResponse",
    "PaymentRequest",
    "TokenCache",
    "UnlimitedLimiter",
    "error_for_status",
    "new_session",
    "parse_error_body",
    "parse_payment",
    "parse_retry_after",
    "process_session",
]
