"""paypoll: a rate-limited, durable payment-polling worker for the Alternative Payments API.

The public Python interface::

    import worker
    ref = worker.submit_payment(account="acme", amount="100", redirect_url="https://x.test/ok")
    worker.get_payment(ref).state        # 'queued', 'pending', 'paid', ...
    worker.wait_for(ref).url             # blocks until the hosted url is known
    with worker.events(group="shop", consumer="web-1") as events:  # every transition
        for event in events:
            handle(event)
            events.ack(event)                # at-least-once: unacked events come back

Settings come from ``PAYPOLL_*`` environment variables unless a ``Producer`` is passed.
Names are imported on first use, so ``import worker`` (and every ``paypoll`` command) stays
cheap and connects to nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from worker.errors import PaypollError, ValidationError, WaitTimeout
    from worker.events import Event, Subscription
    from worker.producer import (
        Producer,
        events,
        get_payment,
        list_payments,
        submit_payment,
        track_payment,
        wait_for,
    )
    from worker.shared_slot import SharedLimiter, SlotTimeout, api_slot
    from worker.store import PaymentRecord, State

_EXPORTS = {
    "PaypollError": "worker.errors",
    "ValidationError": "worker.errors",
    "WaitTimeout": "worker.errors",
    "Event": "worker.events",
    "Subscription": "worker.events",
    "Producer": "worker.producer",
    "events": "worker.producer",
    "get_payment": "worker.producer",
    "list_payments": "worker.producer",
    "submit_payment": "worker.producer",
    "track_payment": "worker.producer",
    "wait_for": "worker.producer",
    "PaymentRecord": "worker.store",
    "State": "worker.store",
    "api_slot": "worker.shared_slot",
    "SharedLimiter": "worker.shared_slot",
    "SlotTimeout": "worker.shared_slot",
}

__all__ = [
    "Event",
    "PaymentRecord",
    "PaypollError",
    "Producer",
    "SharedLimiter",
    "SlotTimeout",
    "State",
    "Subscription",
    "ValidationError",
    "WaitTimeout",
    "__version__",
    "api_slot",
    "events",
    "get_payment",
    "list_payments",
    "submit_payment",
    "track_payment",
    "wait_for",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
