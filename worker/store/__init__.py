"""Payment records in Redis and their state machine.

A payment is identified by (account, reference_id). Its record is a Redis hash; its state is
also kept in one set per state (for listing and gauges), and every active payment has exactly one
entry in a schedule: ``due:{create,track}`` (waiting for its time) or ``inflight:{create,track}``
(dispatched, with a lease). Every change goes through one Lua script, so a record, its indexes,
its schedule and the events stream never disagree.
"""

from worker.store.records import PaymentRecord, PaymentSpec
from worker.store.states import ACTIVE, API_TERMINAL, FINAL, State
from worker.store.store import Claim, PaymentStore, TrackPace, Transition, TransitionWrite

__all__ = [
    "ACTIVE",
    "API_TERMINAL",
    "FINAL",
    "Claim",
    "PaymentRecord",
    "PaymentSpec",
    "PaymentStore",
    "State",
    "TrackPace",
    "Transition",
    "TransitionWrite",
]
