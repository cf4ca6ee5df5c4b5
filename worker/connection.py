"""The Redis connection every paypoll process opens (one pool per process), plain or Sentinel.

``PAYPOLL_REDIS_URL`` is a ``redis://``, ``rediss://`` or ``unix://`` URL, or
``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]``: the client then
asks the sentinels for the current master of ``service_name`` and asks again whenever a
connection fails, so every process (workers, sweeper, producers, CLI, the dramatiq broker)
follows a failover by itself.

``redis+cluster://[:password@]host:port[,host:port...]`` names a Redis Cluster by some of its
nodes: the client learns the slot map from them and follows MOVED and ASK redirections (a
reshard, a failover) by itself. Every key paypoll writes in one command or script is in one
hash slot (see worker/keys.py); dramatiq's Redis broker cannot run on a cluster, so the jobs
then go through ``PAYPOLL_BROKER_URL`` (RabbitMQ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterError
from redis.retry import Retry
from redis.sentinel import Sentinel

SOCKET_TIMEOUT = 10.0  # seconds; no Redis call may block a worker thread forever
CONNECT_TIMEOUT = 5.0  # seconds
HEALTH_CHECK_INTERVAL = 15  # seconds; a pooled connection idle longer is PINGed before use
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
# Seconds a command refused during a slot's migration (TRYAGAIN, redirections) keeps being tried:
# an account's slot holds a few keys per payment, and a reshard moves them in batches.
MIGRATION_PATIENCE = 30.0
MIGRATION_PAUSE = 0.05
# Under Sentinel a failover takes seconds (down-after + election): commands retry with backoff
# for about that long instead of failing at the first refused connection.
SENTINEL_RETRY = Retry(ExponentialBackoff(cap=1.0, base=0.05), 12)


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    password: str | None = field(default=None, repr=False)


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names a Sentinel-managed master."""
    return url.startswith(SENTINEL_SCHEME + "://")


@dataclass(frozen=True)
class ClusterTarget:
    """What a ``redis+cluster://`` URL names."""

    nodes: list[tuple[str, int]]
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster."""
    return url.startswith((CLUSTER_SCHEME + "://", "rediss+cluster://"))


def _host_ports(netloc: str, expected: str) -> tuple[list[tuple[str, int]], str | None]:
    password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[1] if ":" in credentials else credentials)
    nodes = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected {expected}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes, password


def parse_cluster_url(url: str) -> ClusterTarget:
    """The seed nodes and password of a ``redis+cluster://`` (or ``rediss+cluster://``, TLS)
    URL; ValueError saying what is expected otherwise (never echoing a password)."""
    if not is_cluster(url):
        raise ValueError(f"expected a {CLUSTER_SCHEME}:// URL")
    parts = urlsplit(url)
    expected = f"{CLUSTER_SCHEME}://[:password@]host:port[,host:port...]"
    nodes, password = _host_ports(parts.netloc, expected)
    if [p for p in parts.path.split("/") if p]:
        raise ValueError(f"expected no path (a cluster has only db 0): {expected}")
    return ClusterTarget(nodes, password, tls=parts.scheme.startswith("rediss"))


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels, service and db of a ``redis+sentinel://`` URL; ValueError saying what is
    expected otherwise (never echoing a password)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"expected a {SENTINEL_SCHEME}:// URL")
    sentinels, password = _host_ports(
        parts.netloc,
        f"{SENTINEL_SCHEME}://[:password@]host:port[,host:port...]/service[/db]",
    )
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"expected /service_name[/db] after the sentinels of {SENTINEL_SCHEME}://")
    return SentinelTarget(sentinels, path[0], int(path[1]) if len(path) == 2 else 0, password)


def connect_redis(
    url: str,
    *,
    socket_timeout: float = SOCKET_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    retry: Retry | None = None,
) -> redis.Redis:
    """A Redis client for ``url`` (redis://, rediss:// with TLS, passwords in the URL, or
    redis+sentinel:// for the current master of a Sentinel service, redis+cluster:// for a
    Redis Cluster) with timeouts. Connects lazily, on the first command (a cluster client
    reads the slot map when it is made). ``retry``: redis-py's retry policy (default: its own; under
    Sentinel, about ten seconds of backoff to ride out a failover)."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
    }
    if is_cluster(url):
        return _connect_cluster(parse_cluster_url(url), options, retry)
    if not is_sentinel(url):
        if retry is not None:
            options["retry"] = retry
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        target.sentinels,
        socket_timeout=min(socket_timeout, 2.0),
        socket_connect_timeout=min(connect_timeout, 2.0),
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        target.service,
        db=target.db,
        password=target.password,
        retry=retry if retry is not None else SENTINEL_RETRY,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError],
        **options,
    )
    return client


class _PatientCluster(RedisCluster):
    """A cluster client that waits out a slot's migration.

    While a reshard moves a slot key by key, a script whose keys are split between the two
    nodes is refused (TRYAGAIN) until the last key has moved; redis-py retries about a second
    and then raises "TTL exhausted". A payment's step must not fail for a reshard, so such a
    command is tried again, with a pause, for up to MIGRATION_PATIENCE seconds. Every refusal
    came before the command ran: retrying cannot run it twice.
    """

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + MIGRATION_PATIENCE
        while True:
            try:
                return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
            except ClusterError as exc:
                if "TTL exhausted" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(MIGRATION_PAUSE)


def _connect_cluster(
    target: ClusterTarget, options: dict[str, Any], retry: Retry | None
) -> redis.Redis:
    # A RedisCluster offers the commands of redis.Redis that paypoll uses (scripts, pipelines,
    # streams, pub/sub), routed by key slot; it is not a subclass, hence the cast.
    nodes = [ClusterNode(host, port) for host, port in target.nodes]  # type: ignore[no-untyped-call]
    client = _PatientCluster(
        startup_nodes=nodes,
        password=target.password,
        ssl=target.tls,
        retry=retry if retry is not None else SENTINEL_RETRY,
        **options,
    )
    return cast(redis.Redis, client)
