"""The API calls' hot path: HTTP/1.1 exchanges on pooled keep-alive connections of our own.

A GET through requests costs about 0.52 ms of client CPU here, on a bare ``http.client``
connection 0.09 ms, written as one ``sendall`` and read with ``recv`` (worker/api/http1.py)
0.05 ms (benchmarks/http_exchange.py, docs/benchmarks.md, issue 14): requests' session and
adapter layers, urllib3's Retry/Timeout objects and response wrapper, http.client's
header-by-header request and ``email``-parsed answers are most of a poll's HTTP cost, and
paypoll uses none of what they add (no redirects, no cookies, no retries, no content
decoding). So a call that reaches the API directly goes out here; a call through a proxy, or
on a Session a caller handed to the client, still goes through requests
(worker/api/transport.py).

What the exchange keeps from the requests path, because the invariants rest on it:

- the send gate (worker/api/send_gate.py): the connection is made first, then the gate runs
  (the rate-limit slot is waited for after a slow connect, not before it), and the check it
  returns runs right before the request's first byte is written;
- "not sent" told from "sent, answer lost": a failure while connecting (refused, DNS, connect
  timeout, TLS handshake) raises ``ConnectFailed``: nothing was written. Anything after the
  first write raises ``ExchangeFailed``: the request may have reached the API;
- connect and read timeouts apart, TLS verified against the CA bundle requests would use
  (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, else certifi's), a bounded body read.

A pooled connection the server has closed meanwhile (its keep-alive timeout) shows as readable
before reuse; it is dropped and a new one made, before the gate, so a create is not written
into a socket that can only answer with a reset (an ambiguous create).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from functools import partial
from urllib.parse import urlsplit

import certifi

from worker import __version__
from worker.api.http1 import Answer, AnswerReader, encode_request, host_header
from worker.api.send_gate import GateRefused, LastCheck, write_checked

USER_AGENT = f"paypoll/{__version__}"
#: Idle keep-alive connections kept per origin: more than any sane number of worker threads.
POOL_MAXSIZE = 64


class ConnectFailed(Exception):
    """Connecting (TCP, TLS) failed: nothing of the request was written."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason


class ExchangeFailed(Exception):
    """The request was (perhaps partly) written and no complete answer came back."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = isinstance(reason, TimeoutError)


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection to ``host``:``port``, made by ``connect`` (within
    ``timeout`` seconds); ``sock`` is None until then and after ``close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.timeout: float | None = None
        self.sock: socket.socket | None = None
        self.reader: AnswerReader | None = None

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            # The request goes out in one write; Nagle would only delay a second one.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.secure(sock)
        except BaseException:
            sock.close()
            raise
        self.sock, self.reader = sock, AnswerReader(sock)

    def secure(self, sock: socket.socket) -> socket.socket:
        """The socket the exchanges use: this one, in plain HTTP."""
        return sock

    def send(self, data: bytes) -> None:
        assert self.sock is not None, "send on a connection not connected"
        self.sock.sendall(data)

    def dropped(self) -> bool:
        """True when the idle connection is unusable: closed by the server, or holding bytes
        nobody asked for. An idle keep-alive socket is readable only then."""
        if self.sock is None:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        sock, self.sock, self.reader = self.sock, None, None
        if sock is not None:
            sock.close()


class HTTPSConnection(HTTPConnection):
    """The same over TLS, verified against ``context`` (the handshake is part of ``connect``)."""

    def __init__(self, host: str, port: int, *, context: ssl.SSLContext) -> None:
        super().__init__(host, port)
        self.context = context

    def secure(self, sock: socket.socket) -> socket.socket:
        return self.context.wrap_socket(sock, server_hostname=self.host)


class _LastCheckMixin:
    """Runs the gate's last check right before the first byte is written (``send``), and the
    step that check returns right after that write."""

    last_check: LastCheck = None

    def send(self, data: bytes) -> None:
        check, self.last_check = self.last_check, None
        write_checked(check, partial(super().send, data))  # type: ignore[misc]


class DirectHTTPConnection(_LastCheckMixin, HTTPConnection):
    """A connection that runs the gate's last check at its first write."""


class DirectHTTPSConnection(_LastCheckMixin, HTTPSConnection):
    """The same over TLS."""


def default_ssl_context() -> ssl.SSLContext:
    """Certificate and host verification against the bundle requests would use."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    return ssl.create_default_context(cafile=bundle or certifi.where())


class _OriginPool:
    """Idle connections to one origin, most recently used first (the warmest socket)."""

    def __init__(self, make: Callable[[], HTTPConnection], maxsize: int) -> None:
        self._make = make
        self._maxsize = maxsize
        self._idle: list[HTTPConnection] = []
        self._lock = threading.Lock()

    def take(self) -> HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._make()

    def give_back(self, connection: HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._maxsize:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class DirectTransport:
    """Pooled keep-alive connections per origin (scheme, host, port); thread-safe.

    ``http_class``/``https_class`` are the connection classes (tests give slow-connecting
    ones); ``ssl_context`` defaults to ``default_ssl_context()``, made at the first https use.
    """

    def __init__(
        self,
        *,
        maxsize: int = POOL_MAXSIZE,
        user_agent: str = USER_AGENT,
        http_class: type[DirectHTTPConnection] = DirectHTTPConnection,
        https_class: type[DirectHTTPSConnection] = DirectHTTPSConnection,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._maxsize = maxsize
        self._user_agent = user_agent
        self._http_class = http_class
        self._https_class = https_class
        self._ssl_context = ssl_context
        self._pools: dict[tuple[str, str, int], _OriginPool] = {}
        self._lock = threading.Lock()

    def _pool(self, scheme: str, host: str, port: int) -> _OriginPool:
        key = (scheme, host, port)
        pool = self._pools.get(key)
        if pool is not None:
            return pool
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = _OriginPool(lambda: self._connection(scheme, host, port), self._maxsize)
                self._pools[key] = pool
            return pool

    def _connection(self, scheme: str, host: str, port: int) -> HTTPConnection:
        if scheme == "https":
            with self._lock:
                if self._ssl_context is None:
                    self._ssl_context = default_ssl_context()
            return self._https_class(host, port, context=self._ssl_context)
        return self._http_class(host, port)

    def close(self) -> None:
        """Close every idle connection (the ones in use close when given back to no pool)."""
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.close()

    def exchange(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        gate: Callable[[], LastCheck] | None,
        connect_timeout: float,
        read_timeout: float,
        limit: int,
    ) -> Answer:
        """Send one request and read its answer, at most ``limit`` bytes of body.

        ``gate`` runs once the connection is made (a pooled one: at once), and the check it
        returns right before the first byte is written; either raising comes out as
        ``GateRefused`` with nothing written. Raises ``ConnectFailed`` (nothing written) and
        ``ExchangeFailed`` (written, no complete answer). ``url`` must be http(s)://host...
        """
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in ("http", "https") or not parts.hostname:
            raise ConnectFailed(ValueError(f"not an http(s) URL: scheme {scheme!r}"))
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        all_headers = {"Accept-Encoding": "identity", **headers}
        if self._user_agent:
            all_headers = {"User-Agent": self._user_agent, **all_headers}
        try:
            request = encode_request(
                method, target, host_header(parts.hostname, port, default_port), all_headers, body
            )
        except ValueError as exc:
            raise ConnectFailed(exc) from exc  # nothing can be written: as if never connected
        pool = self._pool(scheme, parts.hostname, port)
        connection = pool.take()
        while connection.sock is not None and connection.dropped():
            connection.close()  # the server closed it while idle: the next pooled one, or a new
            connection = pool.take()
        if connection.sock is None:
            connection.timeout = connect_timeout
            try:
                connection.connect()
            except Exception as exc:  # OSError, ssl.SSLError, a bad host name
                connection.close()
                raise ConnectFailed(exc) from exc
            if connection.sock is not None:  # always, once connected; mypy cannot know
                connection.sock.settimeout(read_timeout)
        if gate is not None:
            try:
                last_check = gate()
            except Exception as exc:
                pool.give_back(connection)  # nothing was written: the connection is as it was
                raise GateRefused(exc) from exc
            connection.last_check = last_check  # type: ignore[attr-defined]
        try:
            connection.send(request)  # the request, body included, in one write
        except GateRefused:
            pool.give_back(connection)  # the last check refused: nothing was written
            raise
        except Exception as exc:
            connection.close()
            raise ExchangeFailed(exc) from exc
        try:
            assert connection.reader is not None
            answer = connection.reader.read(limit, head_only=method == "HEAD")
        except Exception as exc:
            connection.close()
            raise ExchangeFailed(exc) from exc
        if answer.reusable:
            pool.give_back(connection)
        else:
            connection.close()  # the server closes it, or the rest of a long body is unread
        return answer


_process_lock = threading.Lock()
_process_transport: tuple[int, DirectTransport] | None = None


def process_transport() -> DirectTransport:
    """The one DirectTransport of this process, made at first use (and again after a fork:
    sockets must not be shared with a forked child)."""
    global _process_transport
    with _process_lock:
        if _process_transport is None or _process_transport[0] != os.getpid():
            _process_transport = (os.getpid(), DirectTransport())
        return _process_transport[1]
