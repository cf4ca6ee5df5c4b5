"""The sweeper: paypoll's durable timer, and the guarantee that no payment is forgotten.

Every active payment has one entry in its account's schedule in Redis (see worker/store): a due
time, or a lease while a worker runs its step. Each pass, for each account, one Lua call
(``claim.lua``) puts back steps whose lease ran out (a lost message, a killed worker), then claims
the due steps, creates first, up to a budget of steps in flight per account; the sweeper sends one
dramatiq message per claimed step. The budget keeps the queues short (about what the account's
rate can serve while a worker may wait for a slot), so polls are dispatched near their due time
however many payments are in tracking, and no worker holds thousands of delayed messages.

One sweeper runs at a time in the whole fleet: each worker process runs a SweeperThread that
takes a Redis lock; the holder renews it every pass, and when it dies another takes over within
the lock's TTL.

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

from worker import defaults
from worker.lease import Lease
from worker.polling.allocation import POLICIES_WITH_PLAN
from worker.polling.planner import PollPlanner
from worker.polling.store import PlanStore
from worker.relay import EventRelay
from worker.settings import Settings
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
    ) -> None:
        self.settings = settings
        self.store = store
        self.send = send
        # A pass's messages in one round trip (Actors.send_many), when given.
        self.send_many = send_many
        self.batch = batch
        self.planner: PollPlanner | None = None
        if settings.poll_policy in POLICIES_WITH_PLAN:
            self.planner = PollPlanner(
                settings=settings, store=PlanStore(redis=store.redis, keys=store.keys)
            )
        self._creates_waiting: dict[str, bool] = {}
        self._dead_workers = store.redis.register_script(_DEAD_WORKERS)
        self.relay = EventRelay(store.redis, store.keys, maxlen=store.events_maxlen)

    def accounts(self) -> Iterable[str]:
        """Configured accounts: only these can be served by this fleet's credentials."""
        return self.settings.accounts.keys()

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
            budgets, lease=s.sweep_grace, batch=self.batch, paces=paces, dead=self.dead_workers()
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
        if self.send_many is not None:
            self.send_many(ordered)
        else:
            for step in ordered:
                self.send(*step)
        return result


class SweeperThread(threading.Thread):
    """Runs a Sweeper every ``interval`` while this process holds the fleet's sweeper lock,
    and writes this process's heartbeat."""

    def __init__(
        self, sweeper: Sweeper, *, redis_client: redis.Redis, identity: str | None = None
    ) -> None:
        super().__init__(name="paypoll-sweeper", daemon=True)
        self.sweeper = sweeper
        self.redis = redis_client
        self.keys = sweeper.store.keys
        self.interval = sweeper.settings.sweep_interval
        self.identity = identity or process_identity()
        self.lock_ttl_ms = int(max(MIN_LOCK_TTL, self.interval * LOCK_TTL_PASSES) * 1000)
        self.stopping = threading.Event()
        self.lease = Lease(
            self.redis, self.keys.sweeper_lock(), self.identity, self.lock_ttl_ms / 1000
        )
        self.holding = False
        # A producer's submit wakes the pass at once (worker/wake.py): an idle key's create
        # leaves within a pass, not an interval, of the submit.
        self.woken = threading.Event()
        self.wake_listener = WakeListener(self.redis, self.keys.wake(), self.woken)

    def start(self) -> None:
        self.wake_listener.start()
        super().start()

    def stop(self) -> None:
        """Ask the thread to finish its pass and give up the lock."""
        self.stopping.set()
        self.woken.set()
        self.wake_listener.stop()

    def run(self) -> None:
        last_beat = 0.0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                if started - last_beat >= HEARTBEAT_EVERY:
                    self._heartbeat()
                    last_beat = started
                self.holding = self.lease.hold()
                if self.holding:
                    self.sweeper.run_pass(self.wake_listener.take_accounts())
            except redis.RedisError as exc:
                # Redis restarting or unreachable: keep trying; the schedule lives in Redis.
                log.warning("sweeper.redis_unavailable", error=str(exc))
                self.stopping.wait(1.0)
            except Exception:
                log.exception("sweeper.pass_failed")
                self.stopping.wait(1.0)
            self._pause(started)
        try:
            self.lease.release()
            self.redis.zrem(self.keys.heartbeat(), self.identity)
        except redis.RedisError:
            pass

    def _pause(self, started: float) -> None:
        """Wait out the rest of the interval, or less when a producer wakes the sweeper."""
        if self.woken.wait(max(0.0, self.interval - (time.monotonic() - started))):
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
