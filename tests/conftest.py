"""Shared fixtures: a real Redis (private when possible) and a unique key prefix per test; a
time limit on every teardown."""

from __future__ import annotations

import faulthandler
import os
import uuid
from collections.abc import Generator, Iterator

import pytest
import redis

from tests.rabbitmq_server import RabbitMQ, rabbitmq_broker
from tests.redis_server import HOW_TO_GET_REDIS, RedisServer, redis_binary, redis_server_binary
from worker.keys import Keys

#: Seconds a test's teardown may take before the run ends with every thread's stack.
TEARDOWN_LIMIT = float(os.environ.get("PAYPOLL_TEST_TEARDOWN_LIMIT", "60"))
#: Seconds a test may outlive its pytest-timeout limit before the run ends the same way.
GRACE = 30.0


def _uncaptured_stderr(item: pytest.Item) -> int:
    from _pytest.faulthandler import fault_handler_stderr_fd_key  # pytest's dup of stderr

    return item.config.stash.get(fault_handler_stderr_fd_key, 2)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """End the run, with every thread's stack, if a test outlives its pytest-timeout limit by
    ``GRACE``: its SIGALRM can land in another thread while the main one waits on a lock, and
    then nothing interrupts it. faulthandler's watchdog is a C thread: it fires however the
    main thread is stuck. (pytest's own faulthandler_timeout ignores per-test limits.)"""
    marker = item.get_closest_marker("timeout")
    limit = item.config.getini("timeout")
    if marker is not None:  # @pytest.mark.timeout(240) or (timeout=240)
        limit = marker.args[0] if marker.args else marker.kwargs.get("timeout", limit)
    faulthandler.dump_traceback_later(
        float(limit) + GRACE, exit=True, file=_uncaptured_stderr(item)
    )
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """Give every teardown a time limit of its own.

    pytest-timeout (and pytest's faulthandler plugin) stop counting as soon as a test fails
    (their pytest_exception_interact hooks cancel them, ours too), so a teardown that hangs
    after a failure (a server thread stuck in a system call) had no limit at all and held CI
    until its own.
    """
    faulthandler.dump_traceback_later(TEARDOWN_LIMIT, exit=True, file=_uncaptured_stderr(item))
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_report_header() -> str:
    """Which redis-server the private servers run (issue 15: an old one once shadowed it)."""
    return redis_binary()[1]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the Redis the tests use: a private server, else ``PAYPOLL_REDIS_URL``."""
    if redis_server_binary():
        server = RedisServer()
        server.start()
        try:
            yield server.url
        finally:
            server.cleanup()
        return
    url = os.environ.get("PAYPOLL_REDIS_URL")
    if not url:
        pytest.exit(f"{redis_binary()[1]}. {HOW_TO_GET_REDIS}", returncode=2)
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


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQ]:
    """A RabbitMQ for the whole run (the local one, else one private server; skipped with the
    reason when neither can be had). Tests take a vhost of their own from it."""
    with rabbitmq_broker() as (server, why_not):
        if server is None:
            pytest.skip(why_not)
        yield server
