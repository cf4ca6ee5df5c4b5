"""paypoll: a rate-limited, durable payment-polling worker for the Alternative Payments API.

The public Python interface::

    import worker
    ref = worker.submit_payment(account="acme", amount="100", redirect_url="https://x.test/ok")
    worker.get_payment(ref).state        # 'queued', 'pending', 'paid', ...

Settings come from ``PAYPOLL_*`` environment variables unless a ``Producer`` is passed.
"""

from __future__ import annotations

__version__ = "0.1.0"

from worker.errors import PaypollError, ValidationError
from worker.producer import (
    Producer,
    get_payment,
    list_payments,
    submit_payment,
    track_payment,
)
from worker.store import PaymentRecord, State

__all__ = [
    "PaymentRecord",
    "PaypollError",
    "Producer",
    "State",
    "ValidationError",
    "__version__",
    "get_payment",
    "list_payments",
    "submit_payment",
    "track_payment",
]
