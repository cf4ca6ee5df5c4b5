"""RabbitMQ for the jobs (issue 14): ``PAYPOLL_BROKER_URL=amqp://user:password@host:5672/vhost``.

dramatiq's Redis broker cannot run on Redis Cluster (its Lua scripts span keys of several slots),
so a deployment past one Redis moves the two job queues (``paypoll-create``, ``paypoll-track``)
to RabbitMQ; Redis keeps everything else (records, limiter, timer, tokens, events).

:class:`DurableRabbitmqBroker` is dramatiq's ``RabbitmqBroker`` with publisher confirms (an
enqueue returns once RabbitMQ holds the message; a missing queue is an error, not a loss),
durable queues and persistent messages (dramatiq's own), declared as **quorum queues**
(replicated with Raft) when the server offers them: RabbitMQ >= 3.8 for the queue and its delay
queue, >= 3.10 for the dead-letter queue (its ``x-message-ttl``). Quorum queues have no
``x-max-priority``; paypoll sets none. A queue that already exists as a classic queue (an older
deployment, or made by hand) cannot be declared quorum (the server answers
PRECONDITION_FAILED): it is used as it is and ``broker.classic_queue`` is logged with how to
migrate it.

A worker that dies with messages unacknowledged gets them redelivered by RabbitMQ as soon as its
connection drops; the sweeper's leases (invariant 4) still cover a message lost any other way,
including one a quorum queue drops past its delivery limit (RabbitMQ 4 sets 20 by default) or
a delivery left unacknowledged past the server's ``consumer_timeout`` (30 min; a step takes at
most its 5-minute TimeLimit).
This module imports pika: it is imported only when RabbitMQ is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import structlog
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.common import dq_name, xq_name
from dramatiq.middleware import Middleware

from worker.demo.redis_provider import redact_url
from worker.errors import PaypollError

log = structlog.get_logger("paypoll.broker")

# RabbitMQ versions: quorum queues came in 3.8, their message TTL (the dead-letter queue's) in 3.10.
QUORUM_SINCE = (3, 8)
QUORUM_TTL_SINCE = (3, 10)
PRECONDITION_FAILED = 406  # AMQP reply code: a declare's arguments differ from the queue's
NOT_FOUND = 404  # AMQP reply code: a passive declare of a queue that does not exist
# Seconds to connect to RabbitMQ and for each answer, for a scrape or `paypoll doctor` (well
# under Prometheus's 4 s scrape timeout).
PROBE_TIMEOUT = 1.0


def quiet_pika() -> None:
    """pika logs each step of every connection, and a failed connect as five errors and a
    traceback, whoever handles it: dramatiq's consumer logs its own connection errors and
    retries, the sweeper logs a failed send, :class:`BrokerUnavailable` names the reason. So
    pika's own logger speaks only of the critical. Idempotent."""
    logging.getLogger("pika").setLevel(logging.CRITICAL)


class BrokerUnavailable(PaypollError):
    """RabbitMQ could not be reached or read. The message names the server with its password
    masked, and the reason (refused login, unknown vhost, connection refused)."""

    def __init__(self, url: str, cause: BaseException) -> None:
        self.reason = describe_error(cause)
        # The server refused the login or the vhost: waiting will not change that.
        self.refused = isinstance(
            cause,
            pika.exceptions.ProbableAuthenticationError | pika.exceptions.ProbableAccessDeniedError,
        )
        super().__init__(f"RabbitMQ at {redact_url(url)}: {self.reason}")


def describe_error(exc: BaseException) -> str:
    """One line for a pika error; pika's texts name the server's reply, never the URL."""
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        return f"login refused (user or password): {exc}"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return f"vhost refused (missing, or no permission on it): {exc}"
    text = str(exc) or (repr(exc.args[0]) if exc.args else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def server_version(properties: dict[str, Any]) -> tuple[int, ...]:
    """The version in a connection's server properties, e.g. (3, 10, 8); (0,) when not said."""
    raw = properties.get("version", b"")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    numbers = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers) or (0,)


def quorum_offered(version: tuple[int, ...], queue_name: str) -> bool:
    """Whether a server of ``version`` can hold ``queue_name`` as a quorum queue."""
    return version >= (QUORUM_TTL_SINCE if queue_name.endswith(".XQ") else QUORUM_SINCE)


class DurableRabbitmqBroker(RabbitmqBroker):
    """dramatiq's RabbitmqBroker with publisher confirms and quorum queues where offered.

    Connects lazily (per thread, as dramatiq's broker does). ``queue_type(name)`` says what a
    queue is (or will be) declared as; ``server_version`` is the server's version.
    """

    def __init__(self, *, url: str, middleware: list[Middleware]) -> None:
        super().__init__(url=url, middleware=middleware, confirm_delivery=True)
        quiet_pika()
        self._version: tuple[int, ...] | None = None
        self._classic: set[str] = set()

    @property
    def server_version(self) -> tuple[int, ...]:
        """The server's version, from this thread's connection."""
        if self._version is None:
            self._version = server_version(self.connection._impl.server_properties)
        return self._version

    def queue_type(self, queue_name: str) -> str:
        """'quorum' or 'classic'."""
        if queue_name in self._classic or not quorum_offered(self.server_version, queue_name):
            return "classic"
        return "quorum"

    def _declare(self, name: str, arguments: dict[str, Any]) -> Any:
        if self.queue_type(name) == "quorum":
            try:
                return self.channel.queue_declare(
                    queue=name, durable=True, arguments={**arguments, "x-queue-type": "quorum"}
                )
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != PRECONDITION_FAILED:
                    raise
                # It exists with other arguments: a classic queue. Keep it (and its messages).
                del self.channel  # the server closed it
                self._classic.add(name)
                log.warning(
                    "broker.classic_queue",
                    queue=name,
                    reason=exc.reply_text,
                    fix="stop the fleets, let the queue drain, delete it "
                    "(rabbitmqctl delete_queue -p VHOST NAME) and start them again",
                )
        return self.channel.queue_declare(queue=name, durable=True, arguments=arguments)

    # dramatiq declares each queue, its delay queue and its dead-letter queue through these.
    def _declare_queue(self, queue_name: str) -> Any:
        return self._declare(queue_name, self._build_queue_arguments(queue_name))  # type: ignore[no-untyped-call]

    def _declare_dq_queue(self, queue_name: str) -> Any:
        return self._declare(dq_name(queue_name), self._build_queue_arguments(queue_name))  # type: ignore[no-untyped-call]

    def _declare_xq_queue(self, queue_name: str) -> Any:
        # A static TTL: RabbitMQ expires messages head first (dramatiq's comment).
        return self._declare(xq_name(queue_name), {"x-message-ttl": DEAD_MESSAGE_TTL})


@dataclass(frozen=True)
class QueueCounts:
    """What RabbitMQ says of one of paypoll's queues (passive declares: nothing is created)."""

    ready: int  # messages waiting, not delivered to a consumer yet
    consumers: int  # consumers attached (each worker process has one per queue)
    delayed: int  # messages of its delay queue (.DQ); paypoll itself sends none
    dead: int  # dead-lettered messages (.XQ)


def _parameters(url: str, timeout: float) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.socket_timeout = timeout
    params.blocked_connection_timeout = timeout
    params.stack_timeout = timeout * 2
    params.connection_attempts = 1
    return params


def _connect(url: str, timeout: float) -> pika.BlockingConnection:
    quiet_pika()
    try:
        return pika.BlockingConnection(_parameters(url, timeout))
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(url, exc) from None


def probe(url: str, *, timeout: float = PROBE_TIMEOUT) -> tuple[int, ...]:
    """Connect once and return the server's version; :class:`BrokerUnavailable` if refused."""
    connection = _connect(url, timeout)
    try:
        return server_version(connection._impl.server_properties)
    finally:
        connection.close()


def read_queues(
    url: str, queues: Sequence[str], *, timeout: float = PROBE_TIMEOUT
) -> dict[str, QueueCounts]:
    """Each queue's counts over one short-lived connection (a queue not declared yet counts 0);
    :class:`BrokerUnavailable` when RabbitMQ cannot be read."""
    connection = _connect(url, timeout)
    found: dict[str, QueueCounts] = {}
    try:
        channel = connection.channel()
        for queue in queues:
            counts: list[tuple[int, int]] = []
            for name in (queue, dq_name(queue), xq_name(queue)):
                try:
                    ok = channel.queue_declare(queue=name, passive=True).method
                    counts.append((int(ok.message_count), int(ok.consumer_count)))
                except pika.exceptions.ChannelClosedByBroker as exc:
                    if exc.reply_code != NOT_FOUND:
                        raise
                    channel = connection.channel()  # the server closed the other one
                    counts.append((0, 0))
            found[queue] = QueueCounts(
                ready=counts[0][0], consumers=counts[0][1], delayed=counts[1][0], dead=counts[2][0]
            )
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(url, exc) from None
    finally:
        if connection.is_open:
            connection.close()
    return found
