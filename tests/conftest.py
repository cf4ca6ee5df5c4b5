"""Shared fixtures: a real Redis (private when possible) and a unique key prefix per test."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.redis_server import HOW_TO_GET_REDIS, RedisServer
from worker.keys import Keys


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the Redis the tests use: a private server, else ``PAYPOLL_REDIS_URL``."""
    if shutil.which("redis-server"):
        server = RedisServer()
        server.start()
        try:
            yield server.url
        finally:
            server.cleanup()
        return
    url = os.environ.get("PAYPOLL_REDIS_URL")
    if not url:
        pytest.exit(HOW_TO_GET_REDIS, returncode=2)
    try:
        redis.Redis.from_url(url).ping()
    except redis.RedisError as exc:
        pytest.exit(f"PAYPOLL_REDIS_URL={url} does not answer ({exc}). {HOW_TO_GET_REDIS}", 2)
    yield url


@pytest.fixture
def key_prefix() -> str:
    """A prefix no other test uses, so tests never see each other's keys."""
    return f"pptest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
def redis_client(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    """A client on the test Redis; this test's keys are deleted afterwards (never FLUSHALL)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(match=f"{key_prefix}*", count=1000):
        client.delete(key)
    client.close()
