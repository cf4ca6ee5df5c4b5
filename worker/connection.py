"""The Redis connection every paypoll process opens (one pool per process)."""

from __future__ import annotations

import redis

SOCKET_TIMEOUT = 10.0  # seconds; no Redis call may block a worker thread forever
CONNECT_TIMEOUT = 5.0  # seconds
HEALTH_CHECK_INTERVAL = 15  # seconds; a pooled connection idle longer is PINGed before use


def connect_redis(url: str) -> redis.Redis:
    """A Redis client for ``url`` (redis://, rediss:// with TLS, passwords in the URL) with
    timeouts. Connects lazily, on the first command."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
