"""The shared token cache: real Redis, real sandbox, real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redis_server import free_port
from tests.sandbox_fixture import running_sandbox
from tests.waiting import wait_until
from worker.api import ApiClient, IssuedToken, TokenCache
from worker.api.auth import FetchToken, cache_ttl
from worker.errors import NotSent
from worker.keys import Keys
from worker.settings import Account, Secret, Settings

CLIENT_ID = "cache-client"
SECRET = "cache-secret-0123456789"
ACCOUNT = Account("acme", CLIENT_ID, Secret(SECRET), rate=1000.0)


def _settings(url: str, prefix: str, **overrides: Any) -> Settings:
    return Settings(api_url=url, key_prefix=prefix, **overrides).with_accounts(ACCOUNT)


@pytest.mark.parametrize(
    ("expires_in", "renew_before", "ttl"),
    [(3600, 60, 3540), (100, 60, 50), (5, 60, 2.5), (0.1, 60, 0.1), (0.01, 0, 0.1)],
)
def test_cache_ttl(expires_in: float, renew_before: float, ttl: float) -> None:
    assert cache_ttl(expires_in, renew_before) == pytest.approx(ttl)


CHILD = r"""
import hashlib, json, sys, time
import redis
from worker.api import ApiClient
from worker.settings import Account, Secret, Settings
url, redis_url, prefix, go_key = sys.argv[1:5]
r = redis.Redis.from_url(redis_url)
settings = Settings(api_url=url, key_prefix=prefix).with_accounts(
    Account("acme", "cache-client", Secret("cache-secret-0123456789"), rate=1000.0))
client = ApiClient(settings=settings, redis=r)
client.session  # connect lazily but build the pool before the start signal
print("ready", flush=True)
deadline = time.monotonic() + 20
while not r.exists(go_key):
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.002)
payment = client.create_payment("acme", amount="5", currency="USD",
                                redirect_url="https://shop.test/back")
token = client.tokens.get(settings.account("acme"))
print(json.dumps({"fetches": client.tokens.fetches, "id": payment.id,
                  "token_sha": hashlib.sha256(token.encode()).hexdigest()}), flush=True)
"""


def test_processes_share_one_token_call(redis_url: str, key_prefix: str) -> None:
    """Four processes ask for a token at the same moment; the sandbox sees ONE token call."""
    go_key = f"{key_prefix}:go"
    with running_sandbox(
        client=[f"{CLIENT_ID}:{SECRET}"], rate=1000, latency="token=300:300"
    ) as sandbox:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, sandbox.url, redis_url, key_prefix, go_key],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        try:
            for child in children:
                assert child.stdout is not None
                if child.stdout.readline().strip() != "ready":
                    child.kill()
                    assert child.stderr is not None
                    pytest.fail(f"a child process did not start: {child.stderr.read()}")
            redis.Redis.from_url(redis_url).set(go_key, 1, ex=60)
            results = []
            for child in children:
                out, err = child.communicate(timeout=30)
                assert child.returncode == 0, err
                results.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        stats = sandbox.client_stats(CLIENT_ID)
    assert stats["token_calls"] == 1
    assert sorted(r["fetches"] for r in results) == [0, 0, 0, 1]
    assert len({r["token_sha"] for r in results}) == 1
    assert len({r["id"] for r in results}) == 4
    assert stats["requests"]["POST /payments/request"] == {"200": 4}


def test_token_renewed_after_expiry(redis_client: redis.Redis, key_prefix: str) -> None:
    with running_sandbox(client=[f"{CLIENT_ID}:{SECRET}"], rate=1000, token_ttl=1.0) as sandbox:
        settings = _settings(sandbox.url, key_prefix, token_renew_before=0.6)
        client = ApiClient(settings=settings, redis=redis_client)
        first = client.create_payment(
            "acme", amount="1", currency="USD", redirect_url="https://a.test/"
        )
        pttl = redis_client.pttl(Keys(key_prefix).token("acme"))
        assert 0 < pttl <= 500  # cached for max(1.0 - 0.6, 1.0 / 2) seconds
        wait_until(
            lambda: not redis_client.exists(Keys(key_prefix).token("acme")),
            timeout=3,
            what="the cached token to expire",
        )
        again = client.get_payment("acme", first.id)
        assert again.id == first.id
        stats = sandbox.client_stats(CLIENT_ID)
    assert stats["token_calls"] == 2
    assert client.tokens.fetches == 2
    # Renewed before the server's expiry: no call was ever refused.
    assert "401" not in json.dumps(stats["requests"])


def _fixed_fetch(calls: list[float], delay: float = 0.0) -> FetchToken:
    def fetch(account: Account, max_wait: float | None) -> IssuedToken:
        calls.append(time.monotonic())
        time.sleep(delay)
        return IssuedToken(access_token=f"tok-{len(calls)}-abcdef", expires_in=60)

    return fetch


@pytest.fixture
def cache_parts(redis_client: redis.Redis, keys: Keys) -> tuple[redis.Redis, Keys]:
    return redis_client, keys


def test_threads_of_one_process_fetch_once(cache_parts: tuple[redis.Redis, Keys]) -> None:
    client, keys = cache_parts
    calls: list[float] = []
    cache = TokenCache(redis=client, keys=keys, fetch=_fixed_fetch(calls, delay=0.2))
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(ACCOUNT))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert got == ["tok-1-abcdef"] * 16
    assert len(calls) == 1
    assert client.get(keys.token("acme")) == b"tok-1-abcdef"
    assert not client.exists(keys.token_lock("acme"))  # released by its owner


def test_dead_lock_holder_is_taken_over(cache_parts: tuple[redis.Redis, Keys]) -> None:
    """A lock left by a process that died expires after lock_ttl; then this process fetches."""
    client, keys = cache_parts
    client.set(keys.token_lock("acme"), "someone-dead", px=400)
    calls: list[float] = []
    cache = TokenCache(redis=client, keys=keys, fetch=_fixed_fetch(calls), lock_ttl=0.4)
    started = time.monotonic()
    assert cache.get(ACCOUNT) == "tok-1-abcdef"
    waited = calls[0] - started
    assert 0.2 <= waited <= 1.5
    assert len(calls) == 1


def test_waiter_takes_the_token_the_renewer_stores(cache_parts: tuple[redis.Redis, Keys]) -> None:
    """While another process holds the lock, this one waits and uses that process's token."""
    client, keys = cache_parts
    client.set(keys.token_lock("acme"), "other-process", px=5000)
    calls: list[float] = []
    cache = TokenCache(redis=client, keys=keys, fetch=_fixed_fetch(calls))
    timer = threading.Timer(0.3, lambda: client.set(keys.token("acme"), "theirs-123456", ex=30))
    timer.start()
    try:
        assert cache.get(ACCOUNT) == "theirs-123456"
    finally:
        timer.join()
    assert calls == []
    assert client.get(keys.token_lock("acme")) == b"other-process"  # not ours to release


def test_invalidate_only_removes_the_same_token(cache_parts: tuple[redis.Redis, Keys]) -> None:
    client, keys = cache_parts
    calls: list[float] = []
    cache = TokenCache(redis=client, keys=keys, fetch=_fixed_fetch(calls))
    old = cache.get(ACCOUNT)
    client.set(keys.token("acme"), "newer-from-elsewhere", ex=30)
    assert cache.invalidate("acme", old) is False
    assert client.get(keys.token("acme")) == b"newer-from-elsewhere"
    assert cache.get(ACCOUNT) == "newer-from-elsewhere"  # memory copy of old was dropped
    assert cache.invalidate("acme", "newer-from-elsewhere") is True
    assert not client.exists(keys.token("acme"))
    assert cache.get(ACCOUNT) == "tok-2-abcdef"


def test_redis_down_is_not_sent(keys: Keys) -> None:
    dead = redis.Redis(
        host="127.0.0.1",
        port=free_port(),
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    calls: list[float] = []
    cache = TokenCache(redis=dead, keys=keys, fetch=_fixed_fetch(calls))
    with pytest.raises(NotSent) as caught:
        cache.get(ACCOUNT)
    assert caught.value.endpoint == "token"
    assert caught.value.retry_safe
    assert calls == []


def test_token_never_in_repr(cache_parts: tuple[redis.Redis, Keys]) -> None:
    client, keys = cache_parts
    calls: list[float] = []
    cache = TokenCache(redis=client, keys=keys, fetch=_fixed_fetch(calls))
    token = cache.get(ACCOUNT)
    assert token not in repr(cache)
    assert token not in repr(IssuedToken(access_token=token, expires_in=1))
