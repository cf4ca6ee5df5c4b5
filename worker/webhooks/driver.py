"""The driver of one endpoint: sends its queue in order, fast while it answers, gently while not.

One driver per endpoint in the whole fleet (a lease in Redis, renewed while it works; a
restarted process takes its own lease back at once, another fleet takes it after the TTL).

- **healthy**: up to ``concurrency`` deliveries in flight, oldest first; each 2xx deletes its
  webhook from the queue. The first failure makes the endpoint **failing**: nothing new is
  started, the ones in flight finish.
- **failing**: only the oldest webhook is tried (a probe), after a backoff of 1 s doubling to
  at most 30 s (+-10%); every other webhook waits in order, untried. The first 2xx makes the
  endpoint healthy again and the backlog drains at the endpoint's concurrency.
- **disabled**: a 410 Gone. Nothing is sent (nothing is dropped either) until an operator runs
  ``paypoll webhooks enable``.

A webhook that fails after ``PAYPOLL_WEBHOOK_RETRY_FOR`` since its transition is dead-lettered
(``paypoll webhooks failed``, ``paypoll webhooks replay``). A slow or dead endpoint holds only
its own driver's threads: no other endpoint, poll or create waits on it.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import redis
import requests
import structlog

from worker import defaults, metrics
from worker.keys import Keys
from worker.lease import Lease
from worker.webhooks.delivery import DELIVERED, GONE, Attempt, attempt
from worker.webhooks.endpoints import Endpoint
from worker.webhooks.queue import (
    DISABLED,
    FAILING,
    HEALTHY,
    EndpointQueue,
    EndpointState,
    QueuedWebhook,
)

log = structlog.get_logger("paypoll.webhooks")

IDLE_WAIT = 1.0  # seconds an idle driver waits for the router's nudge before looking again
RETRY_PAUSE = 1.0  # seconds after a Redis error


def probe_delay(
    failures: int,
    *,
    first: float = defaults.WEBHOOK_PROBE_FIRST,
    cap: float = defaults.WEBHOOK_PROBE_MAX,
    jitter: float = defaults.WEBHOOK_PROBE_JITTER,
    rng: random.Random | None = None,
) -> float:
    """Seconds before the next probe after ``failures`` failed attempts in a row: ``first``
    doubling, +-``jitter``, never above ``cap`` (so an endpoint's return is seen within it)."""
    base = first * 2.0 ** min(max(0, failures - 1), 30)
    spread = (rng or random).uniform(1 - jitter, 1 + jitter)
    return float(min(cap, base * spread))


class EndpointDriver(threading.Thread):
    """Delivers ``endpoint``'s queue while this process holds its lease, until :meth:`stop`."""

    def __init__(
        self,
        *,
        client: redis.Redis,
        keys: Keys,
        endpoint: Endpoint,
        owner: str,
        concurrency: int = defaults.WEBHOOK_CONCURRENCY,
        retry_for: float = defaults.WEBHOOK_RETRY_FOR,
        connect_timeout: float = defaults.WEBHOOK_CONNECT_TIMEOUT,
        read_timeout: float = defaults.WEBHOOK_READ_TIMEOUT,
        lease_ttl: float = defaults.WEBHOOK_LEASE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name=f"paypoll-webhook-{endpoint.name}", daemon=True)
        self.endpoint = endpoint
        self.queue = EndpointQueue(client, keys, endpoint.name)
        self.lease = Lease(client, keys.webhook(endpoint.name, "lease"), owner, lease_ttl)
        self.lease_ttl = lease_ttl
        self.concurrency = concurrency
        self.retry_for = retry_for
        self.timeouts = (connect_timeout, read_timeout)
        self.clock = clock
        self.rng = random.Random()
        self.nudge = threading.Event()  # set by the router when it queued for this endpoint
        self.stopping = threading.Event()
        self._renewed = 0.0
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy or netrc from the environment: exact URL
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=self.name)

    def stop(self) -> None:
        self.stopping.set()
        self.nudge.set()

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    self._step()
                except redis.RedisError as exc:
                    log.warning(
                        "webhooks.redis_unavailable",
                        endpoint=self.endpoint.name,
                        error=type(exc).__name__,
                    )
                    self.stopping.wait(RETRY_PAUSE)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(redis.RedisError):
                self.lease.release()
            self._session.close()

    def _step(self) -> None:
        if not self._hold():
            self.stopping.wait(self.lease_ttl / 3)
            return
        state = self.queue.state()
        if state.status == DISABLED:
            self._wait(IDLE_WAIT)  # until `paypoll webhooks enable`
            return
        if state.status == FAILING:
            self._probe(state)
            return
        if not self._drain():
            self._wait(IDLE_WAIT)

    def _hold(self) -> bool:
        now = time.monotonic()
        if now - self._renewed < self.lease_ttl / 3:
            return True
        if self.lease.hold():
            self._renewed = now
            return True
        self._renewed = 0.0
        return False

    def _wait(self, seconds: float) -> None:
        self.nudge.wait(max(0.0, seconds))
        self.nudge.clear()

    # --- healthy: drain at the endpoint's concurrency ------------------------------------
    def _drain(self) -> bool:
        """Send the queue, oldest first, ``concurrency`` at a time, until it is empty, the
        endpoint fails, or the lease is lost. False when there was nothing to send."""
        in_flight: dict[Future[Attempt], QueuedWebhook] = {}
        cursor: str | None = None
        sent_any = False
        healthy = True
        while not self.stopping.is_set():
            if healthy and self._hold():
                room = self.concurrency - len(in_flight)
                if room > 0:
                    for webhook in self.queue.peek(room, after=cursor):
                        in_flight[self._pool.submit(self._attempt, webhook)] = webhook
                        cursor = webhook.entry_id
                        sent_any = True
            if not in_flight:
                break
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in done:
                webhook = in_flight.pop(future)
                state = self._settle(webhook, future.result(), EndpointState(status=HEALTHY))
                if state.status != HEALTHY and healthy:
                    healthy = False  # start nothing new; let the ones in flight finish
        return sent_any

    # --- failing: one probe at a time, with backoff --------------------------------------
    def _probe(self, state: EndpointState) -> None:
        now = self.clock()
        if now < state.next_probe_at:
            self._wait(min(state.next_probe_at - now, self.lease_ttl / 3))
            return
        oldest = self.queue.peek(1)
        if not oldest:
            self.queue.save_state(EndpointState(status=HEALTHY))
            return
        self._settle(oldest[0], self._attempt(oldest[0]), state)

    # --- one attempt and what it changes -------------------------------------------------
    def _attempt(self, webhook: QueuedWebhook) -> Attempt:
        return attempt(
            self._session,
            self.endpoint,
            webhook,
            connect_timeout=self.timeouts[0],
            read_timeout=self.timeouts[1],
        )

    def _settle(
        self, webhook: QueuedWebhook, result: Attempt, state: EndpointState
    ) -> EndpointState:
        """Record ``result`` of one attempt of ``webhook``; the endpoint's state after it."""
        name = self.endpoint.name
        metrics.WEBHOOK_DELIVERIES.labels(name, result.outcome).inc()
        now = self.clock()
        if result.verdict == DELIVERED:
            self.queue.delivered(webhook)
            metrics.WEBHOOK_LAG_SECONDS.labels(name).observe(max(0.0, now - webhook.at))
            if state.status != HEALTHY:
                log.info("webhooks.endpoint_recovered", endpoint=name, failures=state.failures)
                state = EndpointState(status=HEALTHY)
                self.queue.save_state(state)
            return state
        if result.verdict == GONE:
            state = EndpointState(
                status=DISABLED,
                failures=state.failures + 1,
                last_error=result.detail,
                disabled_reason=f"{result.detail} (410 Gone) on {webhook.msg_id}",
            )
            self.queue.save_state(state)
            log.error(
                "webhooks.endpoint_disabled",
                endpoint=name,
                reason=state.disabled_reason,
                backlog=self.queue.backlog(),
                hint=f"the receiver answered 410 Gone; nothing is sent to it until "
                f"`paypoll webhooks enable {name}` (its webhooks are kept)",
            )
            return state
        if now - webhook.at > self.retry_for:
            self.queue.dead_letter(webhook, result.detail)
            metrics.WEBHOOK_DEAD_LETTERED.labels(name).inc()
            log.error(
                "webhooks.dead_lettered",
                endpoint=name,
                webhook_id=webhook.msg_id,
                reference_id=webhook.reference_id,
                error=result.detail,
            )
        failures = state.failures + 1
        delay = probe_delay(failures, rng=self.rng)
        state = EndpointState(
            status=FAILING, failures=failures, next_probe_at=now + delay, last_error=result.detail
        )
        self.queue.save_state(state)
        log.warning(
            "webhooks.delivery_failed",
            endpoint=name,
            webhook_id=webhook.msg_id,
            outcome=result.outcome,
            error=result.detail,
            failures=failures,
            next_probe_in=round(delay, 2),
        )
        return state
