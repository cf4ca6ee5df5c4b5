"""The Redis connection every paypoll process opens (one pool per process), plain or Sentinel.

``PAYPOLL_REDIS_URL`` is a ``redis://``, ``rediss://`` or ``unix://`` URL, or
``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]``: the client then
asks the sentinels for the current master of ``service_name`` and asks again whenever a
connection fails, so every process (workers, sweeper, producers, CLI, the dramatiq broker)
follows a failover by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

SOCKET_TIMEOUT = 10.0  # seconds; no Redis call may block a worker thread forever
CONNECT_TIMEOUT = 5.0  # seconds
HEALTH_CHECK_INTERVAL = 15  # seconds; a pooled connection idle longer is PINGed before use
SENTINEL_SCHEME = "redis+sentinel"
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


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels, service and db of a ``redis+sentinel://`` URL; ValueError saying what is
    expected otherwise (never echoing a password)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"expected a {SENTINEL_SCHEME}:// URL")
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[1] if ":" in credentials else credentials)
    sentinels = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"expected {SENTINEL_SCHEME}://[:password@]host:port[,host:port...]/service[/db]"
            )
        sentinels.append((host.strip("[]"), int(port)))
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
    redis+sentinel:// for the current master of a Sentinel service) with timeouts. Connects
    lazily, on the first command. ``retry``: redis-py's retry policy (default: its own; under
    Sentinel, about ten seconds of backoff to ride out a failover)."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
    }
    if not is_sentinel(url):
        if retry is not None:
            options["retry"] = retry
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        target.sentinels,
        socket_timeout=min(socket_timeout, 2.0),
        socket_connect_timeout=min(connect_timeout, 2.0),
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service,
        db=target.db,
        password=target.password,
        retry=retry if retry is not None else SENTINEL_RETRY,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError],
        **options,
    )
    return client
