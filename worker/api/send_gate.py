"""Run a callback at the last moment before a request is written: after the connection is made.

The limiter's slot is about when the API sees a call. A pooled keep-alive connection sends at
once, but a new one (the first call of a thread, or after the server closed an idle one)
first connects, and over TLS that takes tens to hundreds of milliseconds: spent after the
slot, it makes the call that late, and a late call can share a 1-second window with the call
``rate`` slots after it (a 429). So the client books its slot first (cheap, and a far slot
sends nothing), then lets the connection run the "gate" (sleep until the slot, check it is
not late, mark a create as sent) once it is connected. The gate may return a last check,
run in ``send`` right before the first byte goes out: building the request line and headers
after the gate is Python work, and on a CPU-starved host a thread can be descheduled there
for tens of milliseconds; a check at the write leaves almost nothing after it.

Only connections of the pools mounted by ``GatedAdapter`` run gates, and only for URLs that
reach the API directly (``plan_send``): through a proxy the client runs the gate itself
before sending, as before. The gate travels in a thread-local, one per exchange, run at most
once. An exception raised by the gate comes out of ``Session.send`` wrapped in ``GateRefused``:
nothing was written, and the caller can tell that apart from a transport failure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies, resolve_proxies, select_proxy
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from worker.errors import PaypollError


class GateRefused(PaypollError):
    """The gate raised ``reason`` before anything was written; the connection was dropped."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(f"not sent: {type(reason).__name__}")
        self.reason = reason


#: What a last check returns: nothing, or a step to run right after the first write.
AfterWrite = Callable[[], None] | None
#: What a gate returns: nothing, or a check to run right before the first byte is written
#: (it raises to send nothing; it may return a step to run once that write is done).
LastCheck = Callable[[], AfterWrite] | None


def write_checked(last_check: LastCheck, write: Callable[[], None]) -> None:
    """``write`` the request's first bytes, with ``last_check`` (if any) run right before it
    (raising GateRefused when it refuses: nothing written) and the step it returns (if any)
    right after: what both gated connection classes do at their first write."""
    after: AfterWrite = None
    if last_check is not None:
        try:
            after = last_check()
        except Exception as exc:
            raise GateRefused(exc) from exc
    write()
    if after is not None:
        after()


@dataclass
class PendingGate:
    """One exchange's gate; ``ran`` says whether a connection ran it."""

    callback: Callable[[], LastCheck]
    ran: bool = False


_local = threading.local()


@contextmanager
def send_gate(callback: Callable[[], LastCheck]) -> Iterator[PendingGate]:
    """Have the next request written by this thread run ``callback`` first, once connected,
    and the check it returns (if any) right before the request's first byte is written."""
    pending = PendingGate(callback)
    _local.pending = pending
    try:
        yield pending
    finally:
        _local.pending = None


class _GatedConnectionMixin:
    """Runs this thread's pending gate after connecting and before writing the request, and
    the gate's last check at the first write."""

    sock: Any
    _last_check: LastCheck = None

    if TYPE_CHECKING:

        def connect(self) -> None: ...  # urllib3's connection class provides it

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        pending: PendingGate | None = getattr(_local, "pending", None)
        if pending is not None and not pending.ran:
            pending.ran = True
            if self.sock is None:
                self.connect()  # what urllib3 would do inside the request, done first
            try:
                self._last_check = pending.callback()
            except Exception as exc:
                raise GateRefused(exc) from exc
        try:
            super().request(method, url, *args, **kwargs)  # type: ignore[misc]
        finally:
            self._last_check = None

    def send(self, data: Any) -> None:
        last_check, self._last_check = self._last_check, None
        write_checked(last_check, partial(super().send, data))  # type: ignore[misc]


class GatedHTTPConnection(_GatedConnectionMixin, HTTPConnection):
    """urllib3's HTTP connection, running the thread's gate before writing."""


class GatedHTTPSConnection(_GatedConnectionMixin, HTTPSConnection):
    """urllib3's HTTPS connection (connected and TLS-established by the pool first)."""


class GatedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = GatedHTTPConnection


class GatedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = GatedHTTPSConnection


class GatedAdapter(HTTPAdapter):
    """An HTTPAdapter whose direct (unproxied) pools use gated connections."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": GatedHTTPConnectionPool,
            "https": GatedHTTPSConnectionPool,
        }


class ApiSession(requests.Session):
    """A Session that reads the environment's proxy settings once per host, not per request.

    requests (``trust_env``) walks ``os.environ`` for proxies on every send and looks for a
    ``~/.netrc`` on every prepare: about 0.2 ms of CPU per call (docs/benchmarks.md, issue 14).
    Here ``trust_env`` is off and ``plan_send`` takes the environment's proxies for a host
    the first time it is used, as requests would have found them. A netrc entry is never
    used: it would replace the client's own Authorization header.
    """

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self._env_proxies: dict[tuple[str, str, str | None], dict[str, str]] = {}
        self._env_lock = threading.Lock()

    def environment_proxies(self, url: str, no_proxy: str | None = None) -> dict[str, str]:
        """The environment's proxies for ``url``'s scheme and host (empty when no_proxy, the
        environment's or the one given, exempts it), read once per scheme and host."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, no_proxy)
        found = self._env_proxies.get(key)
        if found is None:
            with self._env_lock:
                found = get_environ_proxies(url, no_proxy=no_proxy)
                self._env_proxies[key] = found
        return found

    def proxies_for(self, url: str) -> dict[str, str]:
        """The proxies that apply to ``url``: the session's own, and the environment's for its
        scheme (read once per host), as requests' ``resolve_proxies`` would give them with
        ``trust_env``. Empty (or only a ``no_proxy`` entry) when ``url`` goes direct."""
        proxies = dict(self.proxies)
        scheme = urlsplit(url).scheme
        from_env = self.environment_proxies(url, proxies.get("no_proxy"))
        proxy = from_env.get(scheme, from_env.get("all"))
        if proxy:
            proxies.setdefault(scheme, proxy)
        return proxies if select_proxy(url, proxies) is not None else {}


def plan_send(
    session: requests.Session, request: requests.PreparedRequest
) -> tuple[bool, dict[str, str]]:
    """Whether ``session`` will send ``request`` on a gated connection (its adapter is a
    ``GatedAdapter`` and no proxy applies: a proxied request uses other pools), and the
    proxies that apply. Pass those to ``Session.send(proxies=...)``: resolving them reads the
    environment (about 0.2 ms; an ``ApiSession`` does it once per host), which requests would
    otherwise do a second time."""
    url = request.url or ""
    if isinstance(session, ApiSession):
        # What resolve_proxies gives with trust_env, the environment's part read once.
        proxies = session.proxies_for(url)
    else:
        proxies = resolve_proxies(request, dict(session.proxies), session.trust_env)
    gated = (
        isinstance(session.get_adapter(url), GatedAdapter) and select_proxy(url, proxies) is None
    )
    return gated, proxies
