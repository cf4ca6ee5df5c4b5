"""The OAuth access-token cache shared by every paypoll process: one renewer at a time.

Layout in Redis, per account (keys from worker/keys.py, all under the account's hash tag):

- ``Keys.token``: the access token, a plain string with a TTL of ``expires_in - renew_before``
  (at least half the token's lifetime, so short-lived tokens are still cached). It is stored as
  is: Redis is trusted with it like with the rest of paypoll's state (a deployment that does not
  trust its Redis has bigger problems: it holds the queue and the limiter). It is never logged.
- ``Keys.token_lock``: held (``SET NX PX`` with a random owner id) by the one process fetching a
  new token; released only by its owner through compare_and_delete.lua. A holder that dies
  leaves it to expire after ``lock_ttl`` (defaults.TOKEN_LOCK_TTL), and another process takes over.

Waiting for the renewer: the other processes poll the token key (GET + PTTL, one round trip)
with short, growing sleeps (20 ms up to 200 ms) until the token appears, the lock disappears
(then they try to take it), or a bound passes. Polling was chosen over a BLPOP/pub-sub
notification because renewal happens once per token lifetime (an hour with the real API) and
lasts one HTTP round trip: the polling costs a few dozen GETs an hour, and it has no lost-wakeup
case to get wrong (a notification sent before the waiter listens, a renewer that dies before it
notifies). Within a process, threads first queue on a per-account ``threading.Lock``, so only
one thread per process talks to Redis about a missing token; the rest find it in memory.

Each process also keeps the token in memory, until the Redis key's own expiry, so a call usually
costs no Redis round trip for the token at all.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from redis import Redis, RedisError

from worker import defaults
from worker.api.models import BadPayload
from worker.errors import NotSent
from worker.keys import Keys
from worker.settings import Account

#: Shortest time a token is cached, whatever expires_in says (Redis needs a positive TTL).
MIN_TOKEN_TTL = 0.1
#: Sleeps between two looks at the token key while another process renews it.
POLL_FIRST = 0.02
POLL_MAX = 0.2
#: Extra seconds a waiter allows beyond the lock's TTL before giving up.
WAIT_GRACE = 2.0

_COMPARE_AND_DELETE = (
    resources.files("worker.api").joinpath("compare_and_delete.lua").read_text("utf-8")
)


@dataclass(frozen=True)
class IssuedToken:
    """A token as the token endpoint issued it. The repr never shows the token."""

    access_token: str = field(repr=False)
    expires_in: float


#: Fetches a new token for an account over HTTP; the second argument is the caller's max_wait.
FetchToken = Callable[[Account, float | None], IssuedToken]


def cache_ttl(expires_in: float, renew_before: float) -> float:
    """Seconds to cache a token that lives ``expires_in`` seconds.

    ``expires_in - renew_before`` normally; never less than half the lifetime (a token shorter
    than ``renew_before`` is still worth caching), never less than MIN_TOKEN_TTL.
    """
    return max(expires_in - renew_before, expires_in / 2, MIN_TOKEN_TTL)


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TokenCache:
    """Access tokens per account, cached in memory and in Redis, renewed by one process."""

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        fetch: FetchToken,
        renew_before: float = defaults.TOKEN_RENEW_BEFORE,
        lock_ttl: float = defaults.TOKEN_LOCK_TTL,
        on_token: Callable[[str], None] | None = None,
    ) -> None:
        """``fetch`` gets a new token over HTTP; ``on_token`` learns every token (redaction)."""
        self._redis = redis
        self._keys = keys
        self._fetch = fetch
        self._renew_before = renew_before
        self._lock_ttl = lock_ttl
        self._on_token = on_token
        self._compare_and_delete = redis.register_script(_COMPARE_AND_DELETE)
        self._memory: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        #: Token calls this process made (tests and the report of a run read it).
        self.fetches = 0

    def __repr__(self) -> str:
        return f"TokenCache(prefix={self._keys.prefix!r}, accounts={sorted(self._memory)!r})"

    # --- public --------------------------------------------------------------------------------

    def get(self, account: Account, *, max_wait: float | None = None) -> str:
        """A valid-looking access token for ``account``: from memory, Redis, or a new one.

        At most one process fetches at a time; the others wait for its token. Raises what the
        fetch raises (CredentialsRefused, RateLimited, SlotTooFar, ...), and NotSent when Redis
        fails or the renewer does not deliver within ``lock_ttl`` plus a grace.
        """
        token = self._from_memory(account.name)
        if token is not None:
            return token
        local = self._local_lock(account.name)
        if not local.acquire(timeout=self._lock_ttl + WAIT_GRACE):
            raise NotSent(
                "timed out waiting for another thread to renew the access token",
                account=account.name,
                endpoint="token",
            )
        try:
            token = self._from_memory(account.name)
            if token is not None:
                return token
            try:
                return self._from_redis_or_fetch(account, max_wait)
            except RedisError as exc:
                raise NotSent(
                    f"the token cache in Redis failed ({type(exc).__name__})",
                    account=account.name,
                    endpoint="token",
                ) from exc
        finally:
            local.release()

    def invalidate(self, account: str, token: str) -> bool:
        """Forget ``token`` (it got a 401), only if it is still the cached one.

        Returns True when the shared copy in Redis was deleted. A newer token that another
        process already stored is left alone (compare-and-delete).
        """
        cached = self._memory.get(account)
        if cached is not None and cached[0] == token:
            self._memory.pop(account, None)
        try:
            deleted = self._compare_and_delete(keys=[self._keys.token(account)], args=[token])
        except RedisError as exc:
            raise NotSent(
                f"the token cache in Redis failed ({type(exc).__name__})",
                account=account,
                endpoint="token",
            ) from exc
        return bool(deleted)

    # --- inside --------------------------------------------------------------------------------

    def _local_lock(self, account: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(account, threading.Lock())

    def _from_memory(self, account: str) -> str | None:
        cached = self._memory.get(account)
        if cached is None:
            return None
        token, expires_at = cached
        if time.monotonic() >= expires_at:
            self._memory.pop(account, None)
            return None
        return token

    def _remember(self, account: str, token: str, ttl: float) -> str:
        if self._on_token is not None:
            self._on_token(token)
        self._memory[account] = (token, time.monotonic() + ttl)
        return token

    def _from_redis(self, account: str) -> str | None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._keys.token(account))
        pipe.pttl(self._keys.token(account))
        raw, pttl = pipe.execute()
        token = _text(raw)
        if not token or not isinstance(pttl, int) or pttl <= 0:
            # pttl -1 (no TTL) cannot happen for keys we write; treat it as unknown: refetch.
            return None
        return self._remember(account, token, pttl / 1000)

    def _from_redis_or_fetch(self, account: Account, max_wait: float | None) -> str:
        key_lock = self._keys.token_lock(account.name)
        deadline = time.monotonic() + self._lock_ttl + WAIT_GRACE
        pause = POLL_FIRST
        while True:
            token = self._from_redis(account.name)
            if token is not None:
                return token
            owner = secrets.token_hex(16)
            if self._redis.set(key_lock, owner, nx=True, px=max(1, int(self._lock_ttl * 1000))):
                try:
                    return self._renew(account, max_wait)
                finally:
                    self._compare_and_delete(keys=[key_lock], args=[owner])
            if time.monotonic() + pause > deadline:
                raise NotSent(
                    "timed out waiting for another process to renew the access token",
                    account=account.name,
                    endpoint="token",
                )
            time.sleep(pause)
            pause = min(pause * 1.5, POLL_MAX)

    def _renew(self, account: Account, max_wait: float | None) -> str:
        # Another process may have stored a token between our GET and our SET NX.
        token = self._from_redis(account.name)
        if token is not None:
            return token
        self.fetches += 1
        issued = self._fetch(account, max_wait)
        if self._on_token is not None:
            self._on_token(issued.access_token)
        ttl = cache_ttl(issued.expires_in, self._renew_before)
        self._redis.set(
            self._keys.token(account.name), issued.access_token, px=max(1, int(ttl * 1000))
        )
        return self._remember(account.name, issued.access_token, ttl)


#: Lifetime assumed for a token whose answer omits expires_in (the contract always sends it);
#: a 401 renews it earlier if the server thinks otherwise.
DEFAULT_EXPIRES_IN = 300.0


def parse_token(data: object) -> IssuedToken:
    """The token endpoint's JSON: access_token, token_type bearer (any case), expires_in."""
    if not isinstance(data, dict):
        raise BadPayload(f"expected a JSON object, got {type(data).__name__}")
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise BadPayload("field 'access_token' must be a non-empty string")
    token_type = data.get("token_type", "bearer")
    # The provider's pages show both "bearer" and "Bearer" (api-contract.md).
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise BadPayload("field 'token_type' must be 'bearer'")
    expires_in: Any = data.get("expires_in", DEFAULT_EXPIRES_IN)
    if isinstance(expires_in, str):
        try:
            expires_in = float(expires_in)
        except ValueError:
            raise BadPayload("field 'expires_in' must be a number") from None
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise BadPayload("field 'expires_in' must be a positive number")
    return IssuedToken(access_token=token, expires_in=float(expires_in))
