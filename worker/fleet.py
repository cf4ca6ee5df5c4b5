"""`paypoll worker`: a supervised fleet of dramatiq worker processes on this host.

The parent process prepares the metrics directory, serves ``/metrics`` for the whole fleet,
starts N worker processes (``spawn``: fresh interpreters, so prometheus-client's multiprocess
mode is on in each), restarts any that dies, and on SIGTERM/SIGINT stops them all gracefully.
Each worker process runs a dramatiq Worker with M threads on paypoll's two queues and a
SweeperThread (each sweeper shard's lease is held by one process of the whole fleet at a
time). Workers are stateless: any number of fleets on any number of hosts can share one Redis.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import structlog

from worker import defaults
from worker.settings import Settings

log = structlog.get_logger("paypoll.fleet")

STOP_TIMEOUT = 30.0  # seconds a worker process gets to finish its steps before SIGKILL
RESTART_BACKOFF_MAX = 30.0  # seconds between restarts of a worker that keeps dying at start
QUICK_DEATH = 5.0  # seconds: a process dying sooner than this after start backs off
PR_SET_PDEATHSIG = 1  # prctl option: the kernel signals the child when its parent dies
SIGNAL_CHECK_EVERY = 0.5  # seconds between two looks at a stop signal by the main thread


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no worker outlives a
    SIGKILLed fleet. A no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # A parent that died before prctl took effect (SIGKILLed while this process was still
    # importing) sends no signal ever: we would run on as an unsupervised worker. Look once.
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        raise SystemExit(1)


def worker_process_main(settings: Settings, threads: int, index: int) -> None:
    """Body of one worker process: dramatiq Worker + sweeper until SIGTERM/SIGINT."""
    _die_with_parent()
    import redis
    from dramatiq import Worker

    from worker import metrics
    from worker.actors import (
        CREATE_ACTOR,
        CREATE_QUEUE,
        QUEUES,
        TRACK_ACTOR,
        TRACK_QUEUE,
        build_broker,
        declare_actors,
        install_runtime,
    )
    from worker.local_steps import LocalSteps
    from worker.logs import configure_logging
    from worker.runtime import Runtime
    from worker.store import State
    from worker.sweeper import Sweeper, SweeperThread, process_identity

    configure_logging(fmt=settings.log_format, level=settings.log_level)
    from worker.outbox import CALLBACK_GROUP, CALLBACK_STATES
    from worker.webhooks.endpoints import Endpoints
    from worker.webhooks.router import WEBHOOK_GROUP

    endpoints = Endpoints.from_settings(settings)
    groups = [CALLBACK_GROUP] if settings.callback_actor else []
    metrics.prime_outbox(
        groups + ([WEBHOOK_GROUP] if endpoints else []),
        sorted(CALLBACK_STATES) if settings.callback_actor else [],
    )
    metrics.prime_webhooks(endpoints.by_name)
    # Every account's series exist from the start, so Prometheus sees their first increase.
    metrics.prime_accounts(
        settings.accounts,
        [state.value for state in State],
        terminal_state=State.PAID.value,
        actors=(CREATE_ACTOR, TRACK_ACTOR),
    )
    metrics.prime_sweeper(settings.sweeper_shards)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    runtime = Runtime.build(settings)
    runtime.identity = process_identity()
    broker = build_broker(settings)
    actors = declare_actors(broker, settings)
    install_runtime(runtime)
    local = None
    if settings.local_steps:
        local = LocalSteps(
            runtime=runtime,
            threads=settings.local_threads,
            actor_names={"create": CREATE_ACTOR, "track": TRACK_ACTOR},
        )
    sweeper = SweeperThread(
        Sweeper(
            settings=settings,
            store=runtime.store,
            send=actors.send,
            send_many=actors.send_many,
            local=local,
        ),
        redis_client=runtime.redis,
        identity=runtime.identity,
    )
    # Beat once before any step starts: a step's owner is always in the heartbeat set.
    sweeper.beat()
    if local is None:
        queue_timeouts = {frozenset(QUEUES): defaults.WORKER_IDLE_FETCH_MS}
    else:
        # With local steps the track queue carries only what a process had no room for: its
        # idle consumer fetches every second instead of every 50 ms (issue 14: the idle
        # fetches of both queues were 7% of the worker's CPU once polls stopped using them).
        queue_timeouts = {
            frozenset({CREATE_QUEUE}): defaults.WORKER_IDLE_FETCH_MS,
            frozenset({TRACK_QUEUE}): defaults.OVERFLOW_IDLE_FETCH_MS,
        }
    workers = [
        Worker(broker, queues=set(queues), worker_threads=threads, worker_timeout=timeout)
        for queues, timeout in queue_timeouts.items()
    ]
    for worker in workers:
        worker.start()
    if local is not None:
        local.start()
    outbox = None
    if settings.callback_actor and index == 0:
        # One sender per fleet is plenty (a callback is one enqueue); others take over its
        # pending callbacks if this process dies for good.
        from worker.outbox import CallbackOutbox, consumer_name

        outbox = CallbackOutbox(
            client=runtime.redis,
            keys=runtime.keys,
            broker=broker,
            actor_spec=settings.callback_actor,
            consumer=consumer_name(index, settings.metrics_port),
            events_cap=settings.events_maxlen,
        )
        outbox.start()
    webhooks = None
    if index == 0 and endpoints:
        from worker.outbox import consumer_name as owner_name
        from worker.webhooks.service import WebhookService

        webhooks = WebhookService(
            settings=settings,
            store=runtime.store,
            owner=owner_name(index, settings.metrics_port),
        )
        webhooks.start()
    sweeper.start()
    log.info("worker.started", index=index, pid=os.getpid(), threads=threads)
    # Wake now and then rather than block for good: a signal can be taken by another thread
    # (a SIGTERM that arrives while the process is stopped, e.g. PDEATHSIG when a SIGSTOPped
    # worker's fleet dies, is taken by whichever thread runs first after SIGCONT), and CPython
    # then runs the handler only once the main thread runs again.
    while not stop.wait(SIGNAL_CHECK_EVERY):
        pass
    log.info("worker.stopping", index=index, pid=os.getpid())
    sweeper.stop()
    if local is not None:
        # Before the broker's worker: its unstarted steps go back as due for another process.
        local.stop()
    for worker in workers:
        worker.stop(timeout=int(STOP_TIMEOUT * 1000))
    if runtime.keys.cluster:
        # On a cluster the last jobs' events wait in their accounts' outboxes for a sweep
        # pass (worker/relay.py); with this fleet stopping that pass may be a long way off.
        try:
            relayed = sweeper.sweeper.relay.relay_all(settings.accounts)
            log.info("worker.events_relayed", index=index, events=relayed)
        except redis.RedisError as exc:
            # Durable either way: the outboxes keep them for the next sweeper.
            log.warning("worker.relay_failed", index=index, error=str(exc))
    if outbox is not None:
        outbox.stop()
        outbox.join(timeout=5)
    if webhooks is not None:
        webhooks.stop()
    sweeper.join(timeout=5)
    broker.close()
    log.info("worker.stopped", index=index, pid=os.getpid())


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0


@dataclass
class Fleet:
    """N worker processes under supervision, plus the metrics endpoint."""

    settings: Settings
    processes: int
    threads: int
    serve_metrics: bool = True
    slots: list[_Slot] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or :meth:`stop`); returns the exit status."""
        from worker.collectors import AccountLimitsCollector, StoreCollector
        from worker.errors import ConfigError
        from worker.exporter import (
            MULTIPROC_ENV,
            mark_process_dead,
            prepare_multiprocess_dir,
            start_exporter,
        )
        from worker.webhooks.endpoints import Endpoints

        made_dir = not self.settings.metrics_dir
        directory = Path(self.settings.metrics_dir or tempfile.mkdtemp(prefix="paypoll-metrics-"))
        path = prepare_multiprocess_dir(directory)
        os.environ[MULTIPROC_ENV] = str(path)
        exporter = None
        if self.serve_metrics:
            from worker.actors import QUEUES

            collectors = [
                # Its own client with short timeouts and no retries: a scrape must answer
                # (with paypoll_redis_up 0) even while Redis is down.
                StoreCollector.from_url(
                    self.settings.redis_url,
                    keys=self.settings.keys(),
                    namespace=self.settings.namespace,
                    queues=QUEUES,
                    accounts=self.settings.accounts,
                    events_cap=self.settings.events_maxlen,
                    webhook_endpoints=sorted(Endpoints.from_settings(self.settings).by_name),
                    broker_url=self.settings.broker_url,
                ),
                AccountLimitsCollector.from_accounts(self.settings.accounts.values()),
            ]
            try:
                exporter = start_exporter(
                    host=self.settings.metrics_host,
                    port=self.settings.metrics_port,
                    multiprocess_dir=path,
                    collectors=collectors,
                )
            except ConfigError:
                if made_dir:
                    shutil.rmtree(path, ignore_errors=True)
                raise
            log.info("metrics.serving", url=exporter.url)

        self._prepare_event_groups()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stopping.set())
        ctx = multiprocessing.get_context("spawn")
        self.slots = [_Slot(index=i) for i in range(self.processes)]
        try:
            for slot in self.slots:
                self._start(ctx, slot)
            while not self.stopping.is_set():
                sentinels = [s.process.sentinel for s in self.slots if s.process is not None]
                multiprocessing.connection.wait(sentinels, timeout=0.5)
                now = time.monotonic()
                for slot in self.slots:
                    proc = slot.process
                    if proc is not None and not proc.is_alive():
                        mark_process_dead(proc.pid or 0, path)
                        quick = now - slot.started < QUICK_DEATH
                        slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
                        delay = min(RESTART_BACKOFF_MAX, 0.5 * 2**slot.quick_deaths) if quick else 0
                        log.error(
                            "worker.died",
                            index=slot.index,
                            pid=proc.pid,
                            exitcode=proc.exitcode,
                            restart_in=delay,
                        )
                        slot.process = None
                        slot.restart_at = now + delay
                    if (
                        slot.process is None
                        and now >= slot.restart_at
                        and not self.stopping.is_set()
                    ):
                        self._start(ctx, slot)
        finally:
            self._stop_all()
            if exporter is not None:
                exporter.stop()
            if made_dir:
                shutil.rmtree(path, ignore_errors=True)
        return 0

    def _prepare_event_groups(self) -> None:
        """Create the consumer groups this fleet's outbox readers use before any worker runs a
        step: a group starts at the stream's end, so a transition made before it would never
        be sent. A Redis that does not answer yet is left to the readers (they create the
        group themselves) rather than stopping the fleet."""
        import redis

        from worker.connection import connect_redis
        from worker.outbox import prepare as prepare_outbox
        from worker.webhooks.endpoints import Endpoints
        from worker.webhooks.router import prepare as prepare_webhooks

        wanted = []
        if self.settings.callback_actor:
            wanted.append(prepare_outbox)
        if Endpoints.from_settings(self.settings):
            wanted.append(prepare_webhooks)
        if not wanted:
            return
        client = connect_redis(self.settings.redis_url)
        try:
            for prepare in wanted:
                prepare(client, self.settings.keys())
        except redis.RedisError as exc:
            log.warning("events.prepare_failed", error=type(exc).__name__)
        finally:
            client.close()

    def stop(self) -> None:
        """Ask the fleet to stop (as SIGTERM does)."""
        self.stopping.set()

    def _start(self, ctx: multiprocessing.context.BaseContext, slot: _Slot) -> None:
        proc = ctx.Process(  # type: ignore[attr-defined]
            target=worker_process_main,
            args=(self.settings, self.threads, slot.index),
            name=f"paypoll-worker-{slot.index}",
        )
        proc.start()
        slot.process = proc
        slot.started = time.monotonic()
        log.info("worker.spawned", index=slot.index, pid=proc.pid)

    def _stop_all(self) -> None:
        alive = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid or 0, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT + 5
        for proc in alive:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker.kill", pid=proc.pid)
                proc.kill()
                proc.join(5)
