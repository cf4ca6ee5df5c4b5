"""The sweeper's side of the poll planner: each key's budget, plan and pace.

Every PLAN_REFRESH seconds, per key, it reads the plan inputs (pending payments per age bin,
learned completions, slots other software took), works out the poll budget
(:func:`~worker.polling.allocation.poll_budget`), solves the plan for it and stores it for
every worker's track steps. Every sweeper pass it tells the sweeper how many due polls each
key may dispatch (its :class:`~worker.polling.allocation.PollPacer`), so polls never exceed the
budget however many fall due, and due polls wait in the durable timer, oldest due first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from worker import defaults
from worker.polling.allocation import (
    PollPacer,
    create_budget,
    key_capacity,
    poll_budget,
    solve_plan,
    urgency_weights,
)
from worker.polling.store import PlanStore
from worker.settings import Settings
from worker.store import TrackPace


@dataclass
class _KeyState:
    pacer: PollPacer
    creates: PollPacer
    budget: float = 0.0  # polls/s now
    shared_seen: int | None = None  # the shared-slot counter at the last plan
    shared_rate: float = 0.0  # slots/s other software took over the last plan interval
    creates_waiting: bool = False
    max_interval: float = defaults.POLL_MAX_GAP  # the current plan's longest gap between polls
    tracking: bool = False  # payments are pending (their polls need the poll budget)
    indexed: bool = False  # pending payments missing from the age index were added


class PollPlanner:
    """Plans and paces the polls of ``accounts`` (default: every configured key), run by the
    leader of their sweeper shard."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: PlanStore,
        refresh: float = defaults.PLAN_REFRESH,
        clock: Callable[[], float] = time.monotonic,
        accounts: Collection[str] | None = None,
    ) -> None:
        self.settings = settings
        # The keys this planner plans: its sweeper shard's (default: every configured key).
        self.accounts = list(settings.accounts if accounts is None else accounts)
        self.store = store
        self.refresh = refresh
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._last_pass: float | None = None
        self._last_plan: float | None = None

    def budget(self, account: str) -> float:
        """The poll budget (polls/s) the key was last given."""
        state = self._keys.get(account)
        return state.budget if state else 0.0

    def quotas(
        self, creates_waiting: Mapping[str, bool], *, woken: Collection[str] = ()
    ) -> dict[str, TrackPace]:
        """Per key, the pace of this pass's track claims: the whole polls it may dispatch,
        after how many seconds past its not-before a scheduled poll counts as starved (the
        plan's longest interval less the min gap), and whether spare budget pulls polls
        forward. ``creates_waiting`` says which keys had due creates left after the previous
        pass (they keep only the floor share). A key in ``woken`` (a producer just recorded
        work for it) whose creates have no whole call of credit borrows one from its polls:
        a payer waiting for the hosted url of a fresh payment should not wait for the creates'
        share of a busy key to accrue (issue 12: 150 ms + the API's answer at p50)."""
        now = self.clock()
        elapsed = 0.0 if self._last_pass is None else now - self._last_pass
        self._last_pass = now
        s = self.settings
        for account, waiting in creates_waiting.items():
            state = self._state(account)
            if waiting != state.creates_waiting:
                state.creates_waiting = waiting
                self._last_plan = None  # a create backlog began or ended: plan for it now
        if self._last_plan is None or now - self._last_plan >= self.refresh:
            self._plan(now)
        quotas = {}
        for account in self.accounts:
            state = self._state(account)
            state.budget = poll_budget(
                rate=s.accounts[account].rate,
                share=s.poll_share,
                floor=s.poll_floor,
                creates_waiting=state.creates_waiting,
                shared_rate=state.shared_rate,
            )
            state.pacer.accrue(state.budget, elapsed)
            capacity = key_capacity(s.accounts[account].rate, s.rate_margin)
            state.creates.accrue(
                create_budget(capacity=capacity, poll_budget=state.budget, tracking=state.tracking),
                elapsed,
            )
            if account in woken:
                state.pacer.lend_one(state.creates)
            quotas[account] = TrackPace(
                creates=state.creates.quota(),
                polls=state.pacer.quota(),
                starve_after=max(0.0, state.max_interval - s.poll_min_gap),
                # A priced plan spends no spare budget: no early pulls, only due polls.
                pull=s.poll_cost <= 0,
            )
        return quotas

    def spent(self, account: str, polls: int, creates: int = 0) -> None:
        """The sweeper dispatched ``polls`` polls and ``creates`` creates of ``account`` this
        pass (held polls not counted: their calls were paid for when first dispatched)."""
        state = self._state(account)
        state.pacer.spend(polls)
        state.creates.spend(creates)

    def _state(self, account: str) -> _KeyState:
        state = self._keys.get(account)
        if state is None:
            # The creates start with one call: a fleet's first pass creates at once.
            state = self._keys[account] = _KeyState(
                PollPacer(burst_seconds=1.0), PollPacer(burst_seconds=1.0, credit=1.0)
            )
        return state

    def _plan(self, now: float) -> None:
        s = self.settings
        interval = None if self._last_plan is None else now - self._last_plan
        self._last_plan = now
        for account in self.accounts:
            state = self._state(account)
            if not state.indexed:
                # Once per key and process: payments pending from before the age index
                # existed would be invisible to the plan.
                self.store.backfill_ages(account)
                state.indexed = True
        inputs = self.store.read_inputs(self.accounts)
        plans = {}
        for account, got in inputs.items():
            state = self._state(account)
            if state.shared_seen is not None and interval:
                state.shared_rate = max(0, got.shared_slots - state.shared_seen) / interval
            state.shared_seen = got.shared_slots
            state.tracking = sum(got.counts) > 0
            budget = poll_budget(
                rate=s.accounts[account].rate,
                share=s.poll_share,
                floor=s.poll_floor,
                creates_waiting=state.creates_waiting,
                shared_rate=state.shared_rate,
            )
            plan = solve_plan(
                got.counts,
                urgency_weights(got.model, s.poll_policy),
                budget,
                min_gap=s.poll_min_gap,
                max_gap=s.poll_max_gap,
                cost=s.poll_cost,
            )
            state.max_interval = plan.max_interval
            plans[account] = (plan, got.model, budget)
        self.store.write_plans(plans)
