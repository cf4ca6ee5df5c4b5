"""One payment request as the sandbox keeps it, and what it records of the polls it gets.

Poll figures are kept in O(1) per payment (counts, first and last poll, the largest gap
between two polls), never as a list of poll times: a benchmark holds 50,000 payments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from worker.sandbox.lifecycle import TERMINAL, Plan


@dataclasses.dataclass
class Payment:
    """One payment request: what the create said, its drawn plan, and its polls."""

    id: str
    client_id: str
    reference_id: str | None
    amount: str
    currency: str
    redirect_url: str
    url: str
    created_at: float
    plan: Plan
    polls: int = 0
    first_poll_at: float | None = None
    last_poll_at: float | None = None
    max_poll_gap: float = 0.0
    first_seen_terminal_at: float | None = None

    def view(self, status: str) -> dict[str, Any]:
        """The PaymentRequest body (documented fields, then extra ones)."""
        return {
            "id": self.id,
            "reference_id": self.reference_id,
            "status": status,
            "url": self.url,
            "redirect_url": self.redirect_url,
            "amount": self.amount,
            "currency": self.currency,
        }

    def polled(self, at: float) -> None:
        """Count a processed poll that arrived at ``at`` (epoch seconds)."""
        self.polls += 1
        if self.last_poll_at is None:
            self.first_poll_at = self.last_poll_at = at
            return
        # Arrivals judged out of order across threads (by microseconds) make a negative gap:
        # it leaves the maximum and the last poll as they are.
        self.max_poll_gap = max(self.max_poll_gap, at - self.last_poll_at)
        self.last_poll_at = max(self.last_poll_at, at)

    def stats(self, status: str) -> dict[str, Any]:
        """This payment's entry in the stats document (schema in the package docstring)."""
        plan = self.plan
        return {
            "client_id": self.client_id,
            "reference_id": self.reference_id,
            "status": status,
            "outcome": plan.outcome,
            "polls": self.polls,
            "created_at": self.created_at,
            "terminal_at": plan.terminal_at if status in TERMINAL else None,
            "planned_terminal_at": plan.terminal_at,
            "unknown_status_at": plan.unknown_from,
            "first_seen_terminal_at": self.first_seen_terminal_at,
            "first_poll_at": self.first_poll_at,
            "last_poll_at": self.last_poll_at,
            "max_poll_gap": self.max_poll_gap,
        }
