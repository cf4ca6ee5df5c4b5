"""The poll planner's state in Redis: plan inputs, the plans, learned completions.

Per account (all under its hash tag, see worker/keys.py): ``pending_age`` (kept by the store's
scripts), ``completions`` (learned weights, :mod:`worker.polling.model`), ``plan`` (written by
the sweeper, read by every worker's track steps through :class:`PlanCache`) and the counter of
slots other software took (``shared_slots``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from worker import defaults
from worker.keys import Keys
from worker.polling.allocation import Plan
from worker.polling.model import (
    AGE_EDGES,
    COMPLETIONS_CAP,
    CompletionModel,
    model_from_hash,
    parse_weights,
    spread,
    weights_text,
)
from worker.script_batch import ScriptBatch

BACKFILL_BATCH = 500  # pending payments indexed per round trip by backfill_ages


def _load(name: str) -> str:
    return resources.files("worker.polling").joinpath(name).read_text(encoding="utf-8")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class PlanInputs:
    """What one key's plan is made from, read in one round trip."""

    now: float  # Redis clock
    counts: tuple[int, ...]  # pending payments per age bin
    model: CompletionModel
    shared_slots: int  # slots other software took so far (a counter)


class PlanStore:
    """Reads and writes the planner's keys; one Lua call (or one command) per account."""

    def __init__(self, *, redis: redis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._inputs = redis.register_script(_load("plan_inputs.lua"))
        self._observe = redis.register_script(_load("observe.lua"))
        self._backfill = redis.register_script(_load("backfill_ages.lua"))

    def read_inputs(self, accounts: Iterable[str]) -> dict[str, PlanInputs]:
        """Every account's plan inputs, pipelined in one round trip."""
        names = list(accounts)
        batch = ScriptBatch(self.redis)
        k = self.keys
        for account in names:
            batch.add(
                self._inputs,
                [k.pending_age(account), k.completions(account), k.shared_slots(account)],
                AGE_EDGES,
            )
        out = {}
        for account, reply in zip(names, batch.execute(), strict=True):
            flat = reply[2]
            raw = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
            out[account] = PlanInputs(
                now=float(reply[0]),
                counts=tuple(int(c) for c in reply[1]),
                model=model_from_hash(raw),
                shared_slots=int(reply[3]),
            )
        return out

    def write_plans(self, plans: Mapping[str, tuple[Plan, CompletionModel, float]]) -> None:
        """Store each account's (plan, model, allowed poll budget), with the model's median and
        the budget for the dashboard."""
        if not plans:
            return
        pipe = self.redis.pipeline(transaction=False)
        for account, (plan, model, allowed) in plans.items():
            pipe.hset(
                self.keys.plan(account),
                mapping={
                    "threshold": repr(plan.threshold),
                    "max_interval": repr(plan.max_interval),
                    "budget": repr(plan.budget),
                    "allowed": repr(allowed),
                    "weights": weights_text(plan.weights),
                    "median": repr(model.median()),
                    "observed": repr(model.observed),
                    "at": repr(time.time()),
                },
            )
        pipe.execute()

    def read_plan(self, account: str) -> Plan | None:
        """The account's stored plan, or None when none was made (or it is unreadable)."""
        raw = {_text(k): _text(v) for k, v in self.redis.hgetall(self.keys.plan(account)).items()}
        weights = parse_weights(raw.get("weights", ""))
        if weights is None:
            return None
        try:
            return Plan(
                threshold=float(raw["threshold"]),
                max_interval=float(raw["max_interval"]),
                budget=float(raw["budget"]),
                weights=weights,
            )
        except (KeyError, ValueError):
            return None

    def observe(self, account: str, low: float, high: float) -> None:
        """Learn one completion that happened at an age between ``low`` and ``high`` seconds."""
        if not (math.isfinite(low) and math.isfinite(high)):
            return
        args: list[Any] = [COMPLETIONS_CAP]
        for index, weight in sorted(spread(low, high).items()):
            args += [index, f"{weight:.9g}"]
        self._observe(keys=[self.keys.completions(account)], args=args)

    def backfill_ages(self, account: str, *, batch: int = BACKFILL_BATCH) -> int:
        """Index every pending payment of ``account`` that the age index lacks; how many were
        added.

        Payments that became pending under a paypoll older than the planner have no entry,
        so the planner would neither count nor age them. One SCARD/ZCARD pair when nothing
        is missing (every pass may call it); else the pending set is scanned once, in
        batches, each payment's ``created_at`` read from its record (its own time when the
        record has none: the age then counts from now, never from an invented past).
        """
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.scard(k.by_state(account, "pending"))
        pipe.zcard(k.pending_age(account))
        pending, indexed = pipe.execute()
        if int(indexed) >= int(pending):
            return 0
        added = 0
        refs: list[str] = []
        for ref in self.redis.sscan_iter(k.by_state(account, "pending"), count=batch):
            refs.append(_text(ref))
            if len(refs) >= batch:
                added += self._backfill_batch(account, refs)
                refs = []
        if refs:
            added += self._backfill_batch(account, refs)
        return added

    def _backfill_batch(self, account: str, refs: list[str]) -> int:
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for ref in refs:
            pipe.hget(k.payment(account, ref), "created_at")
        pipe.time()
        *created, (secs, micros) = pipe.execute()
        now = f"{int(secs) + int(micros) / 1e6:.6f}"
        args: list[str] = []
        for ref, at in zip(refs, created, strict=True):
            args += [ref, _text(at) if at is not None else now]
        added = self._backfill(
            keys=[k.by_state(account, "pending"), k.pending_age(account)], args=args
        )
        return int(added)

    def take_shared_slot(self, account: str) -> None:
        """Count one slot taken by other software (the planner leaves it to them)."""
        self.redis.incr(self.keys.shared_slots(account))


class PlanCache:
    """A process's copy of each account's plan, read from Redis at most every ``ttl`` seconds.

    A poll needs the plan to place its next due time; the plan changes slowly (the sweeper
    writes one per key every PLAN_REFRESH), so reading it once a second per key and process
    costs one command per second instead of one per poll.
    """

    def __init__(self, store: PlanStore, *, ttl: float = defaults.PLAN_REFRESH) -> None:
        self.store = store
        self.ttl = ttl
        self._plans: dict[str, tuple[float, Plan]] = {}
        self._lock = threading.Lock()

    def get(self, account: str) -> Plan:
        """The account's plan; before the sweeper made one, the idle plan (every min_gap: the
        sweeper's pacer still holds polls to the budget)."""
        now = time.monotonic()
        with self._lock:
            cached = self._plans.get(account)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        plan = self.store.read_plan(account) or Plan.idle()
        with self._lock:
            self._plans[account] = (now, plan)
        return plan
