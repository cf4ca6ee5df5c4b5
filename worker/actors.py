"""The dramatiq side: the broker and the two actors (callbacks: worker/outbox.py).

Actors are declared on a broker passed in (no global broker, no connection at import time). Each
worker process builds one Runtime and installs it with :func:`install_runtime` before its dramatiq
Worker starts; the actors run worker/steps/ with it. Retries are decided by the steps (which
reschedule through the store), so dramatiq's Retries middleware never re-runs these actors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import dramatiq
import structlog
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from worker import metrics, steps
from worker.connection import connect_redis, is_sentinel
from worker.errors import ConfigError
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


def build_broker(settings: Settings) -> dramatiq.Broker:
    """The broker of the job queues, with the middleware paypoll wants (no dramatiq Prometheus
    exporter: paypoll runs its own): RabbitMQ when ``settings.broker_url`` is amqp(s)://
    (worker/rabbitmq.py: confirms, quorum queues), else a Redis broker on
    ``settings.jobs_url()`` under ``settings.namespace``. Connects lazily."""
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
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
        return RedisBroker(  # type: ignore[no-untyped-call]
            client=connect_redis(url),
            namespace=settings.namespace,
            middleware=middleware,
        )
    return RedisBroker(  # type: ignore[no-untyped-call]
        url=url, namespace=settings.namespace, middleware=middleware
    )


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
