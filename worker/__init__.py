"""paypoll: a rate-limited, durable payment-polling worker for the Alternative Payments API."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
