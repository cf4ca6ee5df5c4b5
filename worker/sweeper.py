"""The sweeper: paypoll's durable timer, and the guarantee that no payment is forgotten.

Every active payment has one entry in its account's schedule in Redis (see worker/store): a due
time, or a lease while a worker runs its step. Each pass, for each account, one Lua call
(``claim.lua``) puts back steps whose lease ran out (a lost message, a killed worker), then claims
the due steps, creates first, up to a budget of steps in flight per account; the sweeper sends one
dramatiq message per claimed step. The budget keeps the queues short (about what the account's
rate can serve while a worker may wait for a slot), so polls are dispatched near their due time
however many payments are in tracking, and no worker holds thousands of delayed messages.

Accounts are split among ``PAYPOLL_SWEEPER_SHARDS`` sweeper shards by hash slot
(worker/shards.py); each shard has its own Redis lease and one leader at a time. Each worker
process runs a SweeperThread that leads its fair share of the shards (``ceil(shards / live
processes)``, plus any shard left free for a second), renews each lease every pass and runs
that shard's pass; when a leader dies, another takes its shards as soon as their leases lapse
(the lock's TTL). A producer's wake-up runs a pass of only the shard of the woken account.

On Redis Cluster the sweeper also relays each account's event outbox into the events stream
(worker/relay.py): the store's scripts cannot write the stream there, it is in another slot.

Under the poll planner (the default ``PAYPOLL_POLL_POLICY``), the sweeper also plans and paces
each key's polls (worker/polling/planner.py): tracks are claimed at most at the key's poll
budget, oldest due first, so a key's polls never exceed their share of its rate.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import redis
import structlog

from worker import defaults, metrics
from worker.lease import Lease
from worker.local_steps import LocalSteps
from worker.polling.allocation import POLICIES_WITH_PLAN
from worker.polling.planner import PollPlanner
from worker.polling.store import PlanStore
from worker.relay import EventRelay
from worker.settings import Settings
from worker.shards import partition, plan_leases, shard_of
from worker.store import PaymentStore
from worker.wake import WakeListener

log = structlog.get_logger("paypoll.sweeper")

LOCK_TTL_PASSES = 20  # the lock outlives this many missed passes before another process takes it
MIN_LOCK_TTL = 3.0  # seconds
WOKEN_MIN_GAP = 0.02  # seconds: the shortest time between two passes when producers wake it
HEARTBEAT_EVERY = defaults.HEARTBEAT_EVERY  # seconds between two heartbeats of a process
HEARTBEAT_FORGET = 3600.0  # seconds after which a silent process is dropped from the set


def process_identity() -> str:
    """This process's name in the heartbeat set and as the owner of the steps it runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def inflight_budget(rate: float, max_wait: float, interval: float) -> int:
    """Steps of one account worth having in flight: what its rate serves while a step waits up
    to ``max_wait`` for its slot and the next pass comes ``interval`` later, plus slack."""
    return max(2, math.ceil(rate * (max_wait + 2 * interval)) + 2)


# Heartbeats older than dead_after (ARGV[2]) but newer than the forget horizon (ARGV[1]), on
# the server's clock: the clocks of the beating processes never enter the comparison.
_DEAD_WORKERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - tonumber(ARGV[1])),
                  '(' .. (now - tonumber(ARGV[2])))
"""
# Processes that beat within ARGV[1] seconds (Redis clock): those that may lead shards.
_LIVE_WORKERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""


@dataclass
class PassResult:
    """What one sweep pass did."""

    dispatched_creates: int = 0
    dispatched_tracks: int = 0
    recovered: int = 0
    relayed: int = 0  # events moved from the accounts' outboxes to the stream (Redis Cluster)
    most_overdue: float = 0.0


class Sweeper:
    """Claims due steps per account and hands them to ``send(step, account, reference_id)``."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: PaymentStore,
        send: Callable[[str, str, str], None],
        send_many: Callable[[Sequence[tuple[str, str, str]]], None] | None = None,
        batch: int = defaults.SWEEP_BATCH,
        accounts: Collection[str] | None = None,
        local: LocalSteps | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.send = send
        # A pass's messages in one round trip (Actors.send_many), when given.
        self.send_many = send_many
        self.batch = batch
        # Runs what it claims in this process while it has room (worker/local_steps.py).
        self.local = local
        # The accounts it sweeps: its shard's (default: every configured account).
        self._accounts = list(settings.accounts if accounts is None else accounts)
        self.planner: PollPlanner | None = None
        if settings.poll_policy in POLICIES_WITH_PLAN:
            self.planner = PollPlanner(
                settings=settings,
                store=PlanStore(redis=store.redis, keys=store.keys),
                accounts=self._accounts,
            )
        self._creates_waiting: dict[str, bool] = {}
        self._dead_workers = store.redis.register_script(_DEAD_WORKERS)
        self.relay = EventRelay(store.redis, store.keys, maxlen=store.events_maxlen)

    def accounts(self) -> Iterable[str]:
        """The accounts it sweeps: configured ones only (this fleet's credentials serve only
        these), and of them only its shard's."""
        return self._accounts

    def for_accounts(self, accounts: Collection[str]) -> Sweeper:
        """A sweeper like this one for ``accounts`` only (one shard), with a planner of its own."""
        return Sweeper(
            settings=self.settings,
            store=self.store,
            send=self.send,
            send_many=self.send_many,
            batch=self.batch,
            accounts=accounts,
            local=self.local,
        )

    def dead_workers(self) -> list[str]:
        """Worker processes that beat within the last HEARTBEAT_FORGET seconds but not within
        ``dead_after``: the steps they own are dispatched again. One script on Redis's clock,
        reading only those members of the heartbeat set (O(log N + dead))."""
        dead = self._dead_workers(
            keys=[self.store.keys.heartbeat()],
            args=[HEARTBEAT_FORGET, self.settings.dead_after],
        )
        return [m.decode() if isinstance(m, bytes) else str(m) for m in dead]

    def run_pass(self, woken: Collection[str] = ()) -> PassResult:
        """One pass over every account (one Redis round trip for all claims); the counts.
        ``woken``: accounts producers just recorded work for (their creates go first)."""
        result = PassResult()
        s = self.settings
        budgets = {
            account: inflight_budget(s.accounts[account].rate, s.max_wait, s.sweep_interval)
            for account in self.accounts()
        }
        if not budgets:
            return result
        paces = None
        if self.planner is not None:
            waiting = {a: self._creates_waiting.get(a, False) for a in budgets}
            paces = self.planner.quotas(waiting, woken=woken)
        claims = self.store.claim_due_many(
            budgets,
            lease=s.sweep_grace,
            batch=self.batch,
            paces=paces,
            dead=self.dead_workers(),
            claimer=self.local.owner if self.local is not None else "",
        )
        per_account: list[list[tuple[str, str, str]]] = []
        for account, claim in claims.items():
            if self.planner is not None:
                # Held steps were paid for when first dispatched: their calls are booked.
                self.planner.spent(
                    account,
                    len(claim.tracks) - claim.held_tracks,
                    len(claim.creates) - claim.held_creates,
                )
                # Creates claimed or still due use the key: polls keep only their floor then.
                self._creates_waiting[account] = claim.creates_due > 0 or bool(claim.creates)
            if claim.recovered:
                log.warning("sweeper.recovered", account=account, steps=claim.recovered)
            if claim.outbox:
                result.relayed += self.relay.relay(account)
            per_account.append(
                [("create", account, ref) for ref in claim.creates]
                + [("track", account, ref) for ref in claim.tracks]
            )
            result.dispatched_creates += len(claim.creates)
            result.dispatched_tracks += len(claim.tracks)
            result.recovered += claim.recovered
            result.most_overdue = max(result.most_overdue, claim.most_overdue)
        # Round-robin over accounts: the queue is FIFO, so sending one account's steps in a row
        # made every free thread wait on that account's next slots while other keys sat idle
        # (benchmarks/throughput.py: 100 keys, 2x32 threads, 299 -> 375 calls/s).
        ordered = [
            step
            for group in itertools.zip_longest(*per_account)
            for step in group
            if step is not None
        ]
        if self.local is not None:
            tracks = result.dispatched_tracks
            ordered = self.local.offer(ordered)
            spilled = sum(1 for step in ordered if step[0] == "track")
            metrics.record_local_steps(local=tracks - spilled, spilled=spilled)
        if self.send_many is not None:
            self.send_many(ordered)
        else:
            for step in ordered:
                self.send(*step)
        return result


class SweeperThread(threading.Thread):
    """Leads this process's share of the sweeper shards: every ``interval`` it checks the
    shards' leases (takes its fair share, gives back what another live process lacks), renews
    the lease of each shard it leads and runs that shard's pass; it also writes this process's
    heartbeat. ``sweeper`` sweeps every configured account; each led shard gets a copy of it
    for its own accounts (with one shard, ``sweeper`` itself)."""

    def __init__(
        self, sweeper: Sweeper, *, redis_client: redis.Redis, identity: str | None = None
    ) -> None:
        super().__init__(name="paypoll-sweeper", daemon=True)
        self.sweeper = sweeper
        self.redis = redis_client
        self.keys = sweeper.store.keys
        settings = sweeper.settings
        self.interval = settings.sweep_interval
        self.dead_after = settings.dead_after
        self.identity = identity or process_identity()
        self.lock_ttl_ms = int(max(MIN_LOCK_TTL, self.interval * LOCK_TTL_PASSES) * 1000)
        self.stopping = threading.Event()
        self.shards = settings.sweeper_shards
        self.split = partition(self.keys, sweeper.accounts(), self.shards)
        self.leases = {
            shard: Lease(
                self.redis,
                self.keys.sweeper_shard_lock(shard, self.shards),
                self.identity,
                self.lock_ttl_ms / 1000,
            )
            for shard in range(self.shards)
        }
        self.led: dict[int, Sweeper] = {}  # shard -> its sweeper, while this process leads it
        self._led_now: frozenset[int] = frozenset()  # read by the wake listener's thread
        self._free_since: dict[int, float] = {}  # shard -> when this process first saw it free
        self._live = redis_client.register_script(_LIVE_WORKERS)
        # A producer's submit wakes the pass of the account's shard at once (worker/wake.py):
        # an idle key's create leaves within a pass, not an interval, of the submit. Only the
        # process leading that shard wakes.
        self.woken = threading.Event()
        self.wake_listener = WakeListener(
            self.redis, self.keys.wake(), self.woken, accept=self._leads_account
        )

    @property
    def holding(self) -> bool:
        """True while this process leads at least one shard."""
        return bool(self._led_now)

    def shard_of(self, account: str) -> int:
        """The shard ``account`` belongs to."""
        return shard_of(self.keys, account, self.shards)

    def _leads_account(self, account: str) -> bool:
        return self.shard_of(account) in self._led_now

    def start(self) -> None:
        self.wake_listener.start()
        super().start()

    def stop(self) -> None:
        """Ask the thread to finish its pass and give up its leases."""
        self.stopping.set()
        self.woken.set()
        self.wake_listener.stop()

    def run(self) -> None:
        last_beat = 0.0
        last_check = -math.inf
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                if started - last_beat >= HEARTBEAT_EVERY:
                    self._heartbeat()
                    last_beat = started
                woken = self.wake_listener.take_accounts()
                if started - last_check >= self.interval * 0.99:
                    last_check = started
                    self.check_leases()
                    self.report_local_steps()
                    shards = sorted(self.led)
                else:
                    # Woken between two passes: only the shards of the woken accounts.
                    shards = sorted({self.shard_of(a) for a in woken} & self.led.keys())
                for shard in shards:
                    self._pass(shard, woken)
            except redis.RedisError as exc:
                # Redis restarting or unreachable: keep trying; the schedule lives in Redis.
                log.warning("sweeper.redis_unavailable", error=str(exc))
                self.stopping.wait(1.0)
            except Exception:
                log.exception("sweeper.pass_failed")
                self.stopping.wait(1.0)
            self._pause(started, last_check)
        try:
            for shard in list(self.led):
                self.leases[shard].release()
                self._drop(shard, "sweeper.shard_released")
            self.redis.zrem(self.keys.heartbeat(), self.identity)
        except redis.RedisError:
            pass

    def report_local_steps(self) -> None:
        """The local steps' stages on their gauge, once per interval, leading or not (a
        process that lost its shards drains what it held)."""
        local = self.sweeper.local
        if local is not None:
            metrics.record_local_waiting(local.waiting())

    def check_leases(self) -> None:
        """Read the live processes and every shard's holder (two round trips: redis-py runs no
        script in a cluster pipeline, and the lease keys are in a slot each), then take and
        give back shards as :func:`worker.shards.plan_leases` says."""
        live_raw = self._live(keys=[self.keys.heartbeat()], args=[self.dead_after])
        pipe = self.redis.pipeline(transaction=False)
        for lease in self.leases.values():
            pipe.get(lease.key)
        raw = pipe.execute()
        holders = {shard: _text_or_none(h) for shard, h in zip(self.leases, raw, strict=True)}
        now = time.monotonic()
        for shard, holder in holders.items():
            if holder is None:
                self._free_since.setdefault(shard, now)
            else:
                self._free_since.pop(shard, None)
            if shard in self.led and holder != self.identity:
                # Another process took it (this one stalled past the TTL): stop sweeping it.
                self._drop(shard, "sweeper.shard_lost")
        plan = plan_leases(
            identity=self.identity,
            shards=self.shards,
            holders=holders,
            live=[_text_or_none(m) or "" for m in live_raw],
            free_for={s: now - t for s, t in self._free_since.items()},
        )
        for shard in plan.release:
            self.leases[shard].release()
            self._drop(shard, "sweeper.shard_released")
        ours = [
            s
            for s, h in holders.items()
            if h == self.identity and s not in self.led and s not in plan.release
        ]
        for shard in [*ours, *plan.take]:
            if self.leases[shard].hold():
                self._lead(shard)

    def _lead(self, shard: int) -> None:
        accounts = self.split[shard]
        self.led[shard] = self.sweeper if self.shards == 1 else self.sweeper.for_accounts(accounts)
        self._led_now = frozenset(self.led)
        self._free_since.pop(shard, None)
        metrics.record_shard_leader(shard, leading=True)
        log.info("sweeper.shard_taken", shard=shard, shards=self.shards, accounts=len(accounts))

    def _drop(self, shard: int, event: str) -> None:
        self.led.pop(shard, None)
        self._led_now = frozenset(self.led)
        metrics.record_shard_leader(shard, leading=False)
        log.info(event, shard=shard, shards=self.shards)

    def _pass(self, shard: int, woken: Collection[str]) -> None:
        """Renew the shard's lease and, still its leader, run its pass."""
        if not self.leases[shard].hold():
            self._drop(shard, "sweeper.shard_lost")
            return
        sweeper = self.led[shard]
        began = time.perf_counter()
        sweeper.run_pass([a for a in woken if self.shard_of(a) == shard])
        metrics.record_sweeper_pass(
            shard, accounts=len(self.split[shard]), seconds=time.perf_counter() - began
        )

    def _pause(self, started: float, last_check: float) -> None:
        """Wait out the rest of the interval, or less when a producer wakes the sweeper."""
        if self.woken.wait(max(0.0, self.interval - (time.monotonic() - last_check))):
            # Woken: still no more than one pass per WOKEN_MIN_GAP, so a producer submitting
            # one payment at a time, fast, cannot turn the sweeper into a busy loop.
            self.stopping.wait(max(0.0, WOKEN_MIN_GAP - (time.monotonic() - started)))
        self.woken.clear()

    def beat(self) -> None:
        """Write this process's heartbeat now (before its workers start any step)."""
        self._heartbeat()

    def _heartbeat(self) -> None:
        seconds, micros = self.redis.time()
        now = seconds + micros / 1e6
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.heartbeat(), {self.identity: now})
        pipe.zremrangebyscore(self.keys.heartbeat(), "-inf", now - HEARTBEAT_FORGET)
        pipe.execute()


def _text_or_none(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
