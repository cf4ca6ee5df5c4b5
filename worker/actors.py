"""The dramatiq side: the broker and the two actors (callbacks: worker/outbox.py).

Actors are declared on a broker passed in (no global broker, no connection at import time). Each
worker process builds one Runtime and installs it with :func:`install_runtime` before its dramatiq
Worker starts; the actors run worker/steps/ with it. Retries are decided by the steps (which
reschedule through the store), so dramatiq's Retries middleware never re-runs these actors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import dramatiq
import structlog
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from dramatiq.middleware import (
    AgeLimit,
    CurrentMessage,
    Middleware,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)
from redis.commands.core import Script

from worker import metrics, steps
from worker.connection import connect_redis, is_sentinel
from worker.errors import ConfigError
from worker.lean_script import register_lean_script
from worker.runtime import Runtime
from worker.settings import Settings

CREATE_QUEUE = "paypoll-create"
TRACK_QUEUE = "paypoll-track"
QUEUES = (CREATE_QUEUE, TRACK_QUEUE)
CREATE_ACTOR = "paypoll_create"
TRACK_ACTOR = "paypoll_track"
# A step makes at most one API call (plus a token call) with its own timeouts; this only catches
# a step stuck in pure Python. TimeLimit cannot interrupt a blocking socket call (design.md).
STEP_TIME_LIMIT_MS = 5 * 60 * 1000
# A message older than the sweeper's lease has been re-dispatched already: drop the stale one.
STEP_MAX_AGE_MS_FACTOR = 4

_runtime: Runtime | None = None


def install_runtime(runtime: Runtime) -> None:
    """Set the Runtime the actors of this process use."""
    global _runtime
    _runtime = runtime


def _current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("install_runtime() was not called in this worker process")
    return _runtime


class JobContext(Middleware):
    """Binds each message's id and actor to the log context and measures every job."""

    def before_process_message(self, broker: Any, message: Any) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            message_id=message.message_id,
            actor=message.actor_name,
            attempt=message.options.get("retries", 0) + 1,
        )
        message.options["_paypoll_started"] = time.perf_counter()
        metrics.job_started(message.actor_name)

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        started = message.options.pop("_paypoll_started", None)
        noted = message.options.pop("_paypoll_outcome", "ok")
        outcome = "error" if exception is not None else str(noted)
        if started is not None:
            metrics.job_ended(message.actor_name, outcome, time.perf_counter() - started)
        structlog.contextvars.clear_contextvars()

    after_skip_message = after_process_message


class PaypollBroker(RedisBroker):
    """dramatiq's Redis broker, plus ``enqueue_many``: the sweeper's messages of one pass in
    one pipelined round trip instead of one EVALSHA each (issue 14: 0.26 ms of CPU per call
    went to the sweeper's one-by-one sends); and its scripts are lean ones
    (worker/lean_script.py): every message's fetch share and ack is a dispatch script call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.scripts = {
            name: register_lean_script(self.client, _script_text(script))
            for name, script in self.scripts.items()
        }

    def enqueue_many(self, messages: Sequence[dramatiq.Message[Any]]) -> None:
        """Enqueue ``messages`` (no delay) as ``enqueue`` would, pipelined: the same
        middleware hooks around each, the same dispatch script with the same arguments
        (dramatiq 2.x's ``RedisBroker.enqueue`` and ``_dispatch``)."""
        if not messages:
            return
        pipe = self.client.pipeline(transaction=False)
        dispatch = self.scripts["dispatch"]
        keys = [self.namespace]
        sent = []
        for original in messages:
            message = original.copy(options={"redis_message_id": str(uuid4())})
            self.emit_before("enqueue", message, None)
            args = [
                "enqueue",
                current_millis(),
                message.queue_name,
                self.broker_id,
                self.heartbeat_timeout,
                self.dead_message_ttl,
                self._should_do_maintenance("enqueue"),
                self._max_unpack_size(),  # type: ignore[no-untyped-call]
                message.options["redis_message_id"],
                message.encode(),
            ]
            dispatch(keys=keys, args=args, client=pipe)
            sent.append(message)
        pipe.execute()
        for message in sent:
            self.emit_after("enqueue", message, None)


def _script_text(script: Script) -> str | bytes:
    text = script.script
    if not isinstance(text, str | bytes):
        raise TypeError(f"a script's text is str or bytes, not {type(text).__name__}")
    return text


def build_broker(settings: Settings) -> dramatiq.Broker:
    """The broker of the job queues, with the middleware paypoll wants (no dramatiq Prometheus
    exporter: paypoll runs its own): RabbitMQ when ``settings.broker_url`` is amqp(s)://
    (worker/rabbitmq.py: confirms, quorum queues), else a Redis broker on
    ``settings.jobs_url()`` under ``settings.namespace``. Connects lazily."""
    # Not dramatiq's Callbacks and Pipelines: no paypoll message uses on_success/on_failure
    # or a pipeline, and each middleware is called at every message's every hook.
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Retries(max_retries=0),
        CurrentMessage(),
        JobContext(),
    ]
    problem = settings.jobs_broker_problem()
    if problem:
        raise ConfigError(problem)
    if settings.uses_rabbitmq():
        from worker.rabbitmq import DurableRabbitmqBroker

        broker: dramatiq.Broker = DurableRabbitmqBroker(
            url=settings.broker_url, middleware=middleware
        )
        return broker
    url = settings.jobs_url()
    if is_sentinel(url):
        # dramatiq's broker takes a client: the Sentinel one follows the master.
        return PaypollBroker(
            client=connect_redis(url),
            namespace=settings.namespace,
            middleware=middleware,
        )
    return PaypollBroker(url=url, namespace=settings.namespace, middleware=middleware)


def _note_outcome(outcome: str) -> None:
    # Actors return None (dramatiq has no result backend here); the outcome travels to
    # JobContext on the message instead, for the job metrics.
    message = CurrentMessage.get_current_message()
    if message is not None:
        message.options["_paypoll_outcome"] = outcome


def _create(account: str, reference_id: str) -> None:
    _note_outcome(steps.run_create(_current(), account, reference_id))


def _track(account: str, reference_id: str) -> None:
    _note_outcome(steps.run_track(_current(), account, reference_id))


@dataclass(frozen=True)
class Actors:
    """The actors declared on one broker."""

    create: dramatiq.Actor[[str, str], None]
    track: dramatiq.Actor[[str, str], None]

    def send(self, step: str, account: str, reference_id: str) -> None:
        """Enqueue ``step`` ('create' or 'track') for one payment."""
        actor = self.create if step == "create" else self.track
        actor.send(account, reference_id)

    def send_many(self, steps: Sequence[tuple[str, str, str]]) -> None:
        """Enqueue each (step, account, reference_id) of ``steps``, in order, in one round
        trip when the broker can (a ``PaypollBroker``), else one by one."""
        broker = self.create.broker
        if not isinstance(broker, PaypollBroker):
            for step in steps:
                self.send(*step)
            return
        broker.enqueue_many(
            [
                (self.create if step == "create" else self.track).message(account, reference_id)
                for step, account, reference_id in steps
            ]
        )


def declare_actors(broker: dramatiq.Broker, settings: Settings) -> Actors:
    """Declare paypoll's actors on ``broker`` (once per broker)."""
    max_age = int(settings.sweep_grace * 1000 * STEP_MAX_AGE_MS_FACTOR)
    options: dict[str, Any] = {
        "max_retries": 0,
        "time_limit": STEP_TIME_LIMIT_MS,
        "max_age": max_age,
    }
    create = dramatiq.actor(
        actor_name=CREATE_ACTOR, queue_name=CREATE_QUEUE, broker=broker, **options
    )(_create)
    track = dramatiq.actor(
        actor_name=TRACK_ACTOR, queue_name=TRACK_QUEUE, broker=broker, **options
    )(_track)
    return Actors(create=create, track=track)
