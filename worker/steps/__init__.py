"""The two steps of a payment's life, as plain functions of a Runtime: create and track.

The dramatiq actors (worker/actors.py) only call these. Every outcome ends in exactly one store
transition, which also schedules the payment's next step (or none), so a step never leaves a
payment without a next time (invariant 4). Errors are decided here, not retried by dramatiq.
"""

from worker.steps.create import run_create
from worker.steps.track import run_track

__all__ = ["run_create", "run_track"]
