"""When a payment's next poll is due, by the configured policy.

``planner`` and ``round_robin`` place it by the key's current plan (worker/polling/allocation.py,
read through a :class:`~worker.polling.store.PlanCache`); ``backoff`` keeps the exponential
PollSchedule of worker/schedule.py. Either way the durable timer holds the due time, and under a
plan the sweeper's pacer holds the polls to the key's budget.
"""

from __future__ import annotations

import random

from worker.polling.allocation import POLICIES_WITH_PLAN, next_poll_delay
from worker.polling.store import PlanCache
from worker.schedule import PollSchedule
from worker.settings import Settings


class PollTimer:
    """Delays until the next poll: after a create, and after a poll that saw it pending."""

    def __init__(
        self,
        *,
        settings: Settings,
        schedule: PollSchedule,
        plans: PlanCache,
        rng: random.Random,
    ) -> None:
        self.settings = settings
        self.schedule = schedule
        self.plans = plans
        self.rng = rng
        self.planned = settings.poll_policy in POLICIES_WITH_PLAN

    def after_create(self, account: str) -> float:
        """Seconds from a create to the payment's first poll."""
        if not self.planned:
            return self.settings.poll_first_delay
        return next_poll_delay(self.plans.get(account), 0.0, min_gap=self.settings.poll_min_gap)

    def pull_after(self, seconds: float | None = None) -> float | None:
        """The not-before of a scheduled poll (``seconds`` from now, default the min gap): how
        early the sweeper may pull it forward when the key has budget to spare. None under
        backoff, which never pulls a poll forward."""
        if not self.planned:
            return None
        return self.settings.poll_min_gap if seconds is None else seconds

    def after_poll(self, account: str, *, age: float, polls: int) -> float:
        """Seconds from a poll that found the payment pending (at ``age`` seconds since its
        create, after ``polls`` polls counting this one) to the next."""
        if not self.planned:
            return self.schedule.delay(polls, self.rng)
        return next_poll_delay(self.plans.get(account), age, min_gap=self.settings.poll_min_gap)
