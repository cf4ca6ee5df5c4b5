"""The poll planner's pure parts: the completion model, the plan, next-poll delays, the budget
and the pacer (issue 11: never over budget, min gap held, no starvation, creates' priority and
the floor)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.polling.allocation import (
    Plan,
    PollPacer,
    next_poll_delay,
    planned_rates,
    poll_budget,
    solve_plan,
    urgency_weights,
)
from worker.polling.model import (
    AGE_EDGES,
    BINS,
    PRIOR_WEIGHT,
    CompletionModel,
    bin_of,
    spread,
)

counts_st = st.lists(st.integers(0, 5000), min_size=BINS, max_size=BINS)
weights_st = st.lists(st.floats(0.0, 10.0), min_size=BINS, max_size=BINS)


def _spent(plan: Plan, counts: list[int], min_gap: float, min_rate: float) -> list[float]:
    return planned_rates(counts, plan.weights, plan.threshold, min_gap=min_gap, min_rate=min_rate)


@settings(max_examples=300, deadline=None)
@given(
    counts=counts_st,
    weights=weights_st,
    budget=st.floats(0.05, 50.0),
    min_gap=st.floats(0.2, 5.0),
    bound=st.floats(1.05, 4.0),
)
def test_a_plan_never_exceeds_its_budget_holds_the_gap_and_starves_nobody(
    counts: list[int], weights: list[float], budget: float, min_gap: float, bound: float
) -> None:
    pending = sum(counts)
    plan = solve_plan(counts, weights, budget, min_gap=min_gap, max_gap=1e9, starvation_bound=bound)
    if pending == 0:
        assert plan.budget == 0
        return
    if math.isinf(plan.threshold):  # round robin at the budget
        assert plan.max_interval == pytest.approx(pending / budget)
        return
    fair = budget / pending
    min_rate = fair / bound
    rates = _spent(plan, counts, min_gap, min_rate)
    spent = sum(c * r for c, r in zip(counts, rates, strict=True))
    assert spent <= budget * (1 + 1e-6) or pending / min_gap <= budget
    assert all(r <= 1 / min_gap + 1e-12 for r in rates)  # never faster than the min gap
    if pending / min_gap > budget:
        assert spent == pytest.approx(budget, rel=1e-5)  # a loaded key spends all of it
        assert all(r >= min_rate * (1 - 1e-9) for r in rates)  # nobody starves
        assert plan.max_interval <= bound * pending / budget * (1 + 1e-9)
    else:
        assert plan.threshold == 0  # light load: everything every min gap


@settings(max_examples=200, deadline=None)
@given(counts=counts_st, weights=weights_st, budget=st.floats(0.5, 20.0))
def test_a_likelier_payment_is_never_polled_less_often(
    counts: list[int], weights: list[float], budget: float
) -> None:
    plan = solve_plan(counts, weights, budget)
    if not sum(counts) or plan.threshold in (0.0, math.inf):
        return
    rates = planned_rates(
        counts, weights, plan.threshold, min_gap=1.0, min_rate=1 / plan.max_interval
    )
    order = sorted(range(BINS), key=lambda i: weights[i])
    for low, high in itertools.pairwise(order):
        assert rates[low] <= rates[high] + 1e-12


def test_light_load_polls_every_min_gap_and_saturation_is_round_robin_at_worst() -> None:
    flat = (1.0,) * BINS
    counts = [0] * BINS
    counts[bin_of(30)] = 3
    light = solve_plan(counts, flat, 4.5, min_gap=1.0)
    assert light.threshold == 0 and next_poll_delay(light, 30.0, min_gap=1.0) == 1.0
    counts[bin_of(30)] = 5000
    heavy = solve_plan(counts, flat, 4.5, min_gap=1.0)
    # Equal weights: every payment once per pending/budget seconds.
    assert next_poll_delay(heavy, 30.0) == pytest.approx(5000 / 4.5, rel=1e-3)


@settings(max_examples=200, deadline=None)
@given(
    counts=counts_st,
    weights=weights_st,
    budget=st.floats(0.5, 20.0),
    age=st.floats(0.0, 200_000.0),
    min_gap=st.floats(0.2, 3.0),
)
def test_next_poll_delay_is_within_the_gap_and_the_plans_longest_interval(
    counts: list[int], weights: list[float], budget: float, age: float, min_gap: float
) -> None:
    plan = solve_plan(counts, weights, budget, min_gap=min_gap, max_gap=3600.0)
    delay = next_poll_delay(plan, age, min_gap=min_gap)
    assert min_gap <= delay <= max(min_gap, plan.max_interval) + 1e-9


def test_next_poll_delay_follows_the_urgency_integral() -> None:
    weights = [0.0] * BINS
    weights[bin_of(5)] = 0.5  # bin [4, 6)
    weights[bin_of(7)] = 2.0  # bin [6, 8)
    plan = Plan(threshold=2.0, max_interval=1000.0, budget=1.0, weights=tuple(weights))
    # From age 4: 2 s at 0.5 gives 1.0, then 0.5 s at 2.0 gives the other 1.0: due at age 6.5.
    assert next_poll_delay(plan, 4.0, min_gap=0.1) == pytest.approx(2.5)
    # A payment in a zero-urgency bin waits for the urgency to come, within the longest interval.
    assert next_poll_delay(plan, 0.0, min_gap=0.1) == pytest.approx(6.5)


def test_poll_budget_keeps_creates_first_and_the_floor() -> None:
    assert poll_budget(rate=5, share=0.9, floor=0.2, creates_waiting=False) == pytest.approx(4.5)
    assert poll_budget(rate=5, share=0.9, floor=0.2, creates_waiting=True) == pytest.approx(1.0)
    # Shared callers' slots come off the share, never below the floor.
    assert poll_budget(
        rate=5, share=0.9, floor=0.2, creates_waiting=False, shared_rate=1.5
    ) == pytest.approx(3.0)
    assert poll_budget(
        rate=5, share=0.9, floor=0.2, creates_waiting=False, shared_rate=9
    ) == pytest.approx(1.0)


@settings(max_examples=200, deadline=None)
@given(
    budget=st.floats(0.1, 50.0),
    passes=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=200),
)
def test_the_pacer_never_dispatches_more_than_the_budget_plus_one_burst(
    budget: float, passes: list[float]
) -> None:
    pacer = PollPacer(burst_seconds=1.0)
    dispatched = 0
    for elapsed in passes:
        pacer.accrue(budget, elapsed)
        quota = pacer.quota()
        pacer.spend(quota)
        dispatched += quota
    assert dispatched <= budget * sum(passes) + 1e-6
    assert pacer.credit >= 0


def test_the_pacer_spends_the_budget_exactly_over_time() -> None:
    pacer = PollPacer()
    dispatched = 0
    for _ in range(4000):  # 1,000 s of passes every 0.25 s
        pacer.accrue(4.5, 0.25)
        quota = pacer.quota()
        pacer.spend(quota)
        dispatched += quota
    assert 4499 <= dispatched <= 4500


def test_the_prior_gives_every_age_a_positive_hazard_and_spread_keeps_weight() -> None:
    model = CompletionModel()
    assert sum(model.weights) == pytest.approx(PRIOR_WEIGHT)
    assert all(h > 0 for h in model.hazards())
    parts = spread(3.0, 47.0)
    assert sum(parts.values()) == pytest.approx(1.0)
    assert min(parts) == bin_of(3.0) and max(parts) == bin_of(47.0)
    assert spread(500.0, 500.0) == {bin_of(500.0): 1.0}
    assert spread(1e6, 2e6) == {BINS - 1: 1.0}


def test_a_learned_uniform_lifecycle_has_its_median_and_its_hazard_shape() -> None:
    rng = random.Random(3)
    observed: dict[int, float] = {}
    for _ in range(2000):
        age = rng.uniform(5, 120)
        for index, weight in spread(age - 0.5, age + 0.5).items():
            observed[index] = observed.get(index, 0.0) + weight
    model = CompletionModel.learned(observed)
    assert model.median() == pytest.approx(62.5, abs=3)
    hazards = model.hazards()
    # Nothing completes before 4 s; the hazard climbs towards the end of the window (1/(120-a)).
    assert hazards[bin_of(1)] < hazards[bin_of(30)] / 20
    assert hazards[bin_of(30)] < hazards[bin_of(100)]
    planner = urgency_weights(model, "planner")
    assert planner[bin_of(100)] == pytest.approx(math.sqrt(hazards[bin_of(100)]))
    assert set(urgency_weights(model, "round_robin")) == {1.0}
    assert AGE_EDGES[0] == 0


def test_a_priced_plan_polls_where_a_poll_saves_its_cost_and_leaves_spare_budget() -> None:
    weights = [0.5] * BINS  # urgency 0.5/s at every age: hazard 0.25/s
    counts = [0] * BINS
    counts[bin_of(10)] = 3
    # Free polls: 3 payments, every min gap. Priced at 2 s of delay: tau = sqrt(2 x 2) / 0.5 = 4 s.
    assert solve_plan(counts, weights, 4.5).threshold == 0
    priced = solve_plan(counts, weights, 4.5, cost=2.0)
    assert priced.threshold == pytest.approx(2.0)
    assert priced.budget == pytest.approx(3 / 4.0)
    assert next_poll_delay(priced, 10.0) == pytest.approx(4.0)
    # The budget stays a cap: 5,000 such payments get the budget, not 1,250 polls/s.
    counts[bin_of(10)] = 5000
    capped = solve_plan(counts, weights, 4.5, cost=2.0)
    assert capped.budget == pytest.approx(4.5, rel=1e-5)
