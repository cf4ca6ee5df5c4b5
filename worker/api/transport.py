"""The requests path, and what a failed exchange means: never sent, or sent and lost.

API calls go out on worker/api/direct.py; calls through a proxy (and on a Session handed to the
client) take one pooled ``requests.Session`` per process, sized for many worker threads, with
urllib3's own retries off: every retry decision belongs to paypoll (design.md, invariant 3),
because a blind retry of a create could create a second payment.

Telling "not sent" from "sent, answer lost" is what keeps creates at most once. With
``max_retries=0`` requests raises, for this urllib3:

- a refused connection, DNS failure or connect timeout: ``ConnectionError(MaxRetryError(reason=
  NewConnectionError | ConnectTimeoutError))`` or ``ConnectTimeout``: nothing reached the server
  -> NotSent (retry-safe);
- the server closed or reset the connection after we wrote the request (``RemoteDisconnected``,
  ``ConnectionResetError``): ``ConnectionError(ProtocolError("Connection aborted.", ...))`` ->
  Ambiguous, although it is a ConnectionError too;
- ``ReadTimeout``, ``ChunkedEncodingError``, a read timeout while reading the body
  (``ConnectionError(ReadTimeoutError)``) -> Ambiguous.

Anything not positively recognised as a connect-phase failure is Ambiguous: the safe side.
A pooled keep-alive connection that the server had already closed before we wrote anything also
shows up as "Connection aborted"; for a create that stays Ambiguous (we cannot tell it apart),
for a GET the client simply retries once (a GET is idempotent).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping

import requests
import urllib3.exceptions
from requests.cookies import RequestsCookieJar
from requests.hooks import default_hooks
from requests.structures import CaseInsensitiveDict

from worker.api.direct import USER_AGENT, ConnectFailed, ExchangeFailed
from worker.api.send_gate import ApiSession, GatedAdapter
from worker.errors import Ambiguous, NotSent, TransportError

#: Connections kept per host: more than any sane number of worker threads per process.
POOL_MAXSIZE = 64
#: Distinct hosts kept in the pool (the API, the demo API, a sandbox).
POOL_CONNECTIONS = 4

_lock = threading.Lock()
_session: tuple[int, requests.Session] | None = None


def new_session(*, pool_maxsize: int = POOL_MAXSIZE) -> requests.Session:
    """A Session with a large pool, no automatic retries and paypoll's User-Agent, that reads
    the environment's proxies once per host (``ApiSession``)."""
    session = ApiSession()
    adapter = GatedAdapter(
        pool_connections=POOL_CONNECTIONS, pool_maxsize=pool_maxsize, max_retries=0
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    # The client sends prepared requests (Session.send), which skips Session.request's merge of
    # the environment's CA bundle; honour it here, as requests would.
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    return session


#: A last path segment that URL preparation leaves as it is: unreserved characters, not "." or
#: ".." (which it would resolve). What quote(id, safe="") gives for the API's payment ids.
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]*")
_normal_prefixes: dict[str, bool] = {}


def _url_is_normal(session: requests.Session, url: str) -> bool:
    """Whether ``Session.prepare_request`` would give ``url`` back unchanged: its last segment
    is plain and the rest was checked once (a plain segment after a normal prefix stays as it
    is: preparation only re-encodes, lower-cases the scheme and host, and resolves dots)."""
    prefix, _, last = url.rpartition("/")
    if not _PLAIN_SEGMENT.fullmatch(last):
        return False
    normal = _normal_prefixes.get(prefix)
    if normal is None:
        probe = prefix + "/x"
        normal = session.prepare_request(requests.Request("GET", probe)).url == probe
        if len(_normal_prefixes) < 64:
            _normal_prefixes[prefix] = normal
    return normal


def prepare(
    session: requests.Session,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    json_body: Mapping[str, str] | None = None,
    form_body: str | None = None,
) -> requests.PreparedRequest:
    """``session.prepare_request`` of this request, the same PreparedRequest, about 80 us
    sooner (issue 14) for a plain ``ApiSession`` (no cookies, auth, params or hooks of its own)
    and a URL that preparation keeps as it is: requests' general merge of settings spends most
    of its time in isinstance checks against runtime protocols. Any other case takes
    requests' own path."""
    plain = (
        isinstance(session, ApiSession)
        and not session.cookies
        and session.auth is None
        and not session.params
        and session.hooks.get("response") == []
        and _url_is_normal(session, url)
    )
    if not plain:
        return session.prepare_request(
            requests.Request(method, url, headers=dict(headers), json=json_body, data=form_body)
        )
    merged: CaseInsensitiveDict[str | bytes] = CaseInsensitiveDict(session.headers)
    merged.update(headers)
    prepared = requests.PreparedRequest()
    prepared.prepare_method(method)
    prepared.url = url
    prepared.prepare_headers(merged)
    prepared.prepare_cookies(RequestsCookieJar())
    prepared.prepare_body(form_body, None, json_body)
    prepared.prepare_auth(None, url)
    prepared.hooks = default_hooks()
    return prepared


def encode_body(
    headers: Mapping[str, str],
    json_body: Mapping[str, str] | None,
    form_body: str | None,
) -> tuple[bytes | None, dict[str, str]]:
    """The body's bytes and the headers to send with it, as requests' preparation makes them:
    JSON (``allow_nan=False``) with ``Content-Type: application/json`` unless one is given,
    a form body as the UTF-8 of the string given (its Content-Type is the caller's)."""
    all_headers = dict(headers)
    if json_body is not None:
        if not any(name.lower() == "content-type" for name in all_headers):
            all_headers["Content-Type"] = "application/json"
        return json.dumps(json_body, allow_nan=False).encode("utf-8"), all_headers
    if form_body is not None:
        return form_body.encode("utf-8"), all_headers
    return None, all_headers


def process_session() -> requests.Session:
    """The one Session of this process, created on first use (and again after a fork).

    Sockets must not be shared with a forked child, hence the pid check.
    """
    global _session
    with _lock:
        if _session is None or _session[0] != os.getpid():
            _session = (os.getpid(), new_session())
        return _session[1]


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: args, ``reason``, ``__cause__``/``__context__``, in order."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen) or len(seen) > 20:
            continue
        seen.append(current)
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        todo.extend(a for a in current.args if isinstance(a, BaseException))
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)
    return seen


def _detail(exc: BaseException) -> str:
    """A short, secret-free name of the root cause, e.g. ``ConnectionRefusedError``.

    Only class names and OS error strings are used: the texts of requests/urllib3 exceptions
    carry URLs and connection reprs that have no business in our messages.
    """
    chain = _chain(exc)
    for item in reversed(chain):
        if isinstance(item, OSError) and item.strerror:
            return f"{type(item).__name__}: {item.strerror}"
    names = [type(item).__name__ for item in chain]
    return names[-1] if names else type(exc).__name__


def _is_connect_failure(exc: requests.RequestException) -> bool:
    if isinstance(exc, requests.ConnectTimeout | requests.exceptions.ProxyError):
        return True
    if isinstance(exc, requests.exceptions.SSLError):
        # A TLS failure is a handshake failure: the request itself was not written yet.
        return True
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema):
        return True
    if isinstance(exc, requests.ConnectionError):
        inner = exc.args[0] if exc.args else None
        if isinstance(inner, urllib3.exceptions.MaxRetryError):
            # NewConnectionError (and NameResolutionError) subclass ConnectTimeoutError.
            return isinstance(inner.reason, urllib3.exceptions.ConnectTimeoutError)
    return False


def is_connection_aborted(exc: BaseException) -> bool:
    """True when the server closed or reset the connection without an answer.

    Also how a stale pooled keep-alive connection looks; used to retry a GET once.
    """
    return any(
        isinstance(item, ConnectionResetError | ConnectionAbortedError | BrokenPipeError)
        or type(item).__name__ == "RemoteDisconnected"
        for item in _chain(exc)
    )


def transport_error(
    exc: requests.RequestException | ConnectFailed | ExchangeFailed,
    *,
    account: str,
    endpoint: str,
    connect_timeout: float,
    read_timeout: float,
) -> TransportError:
    """NotSent when ``exc`` proves nothing reached the server, Ambiguous otherwise (a
    requests exception, or the direct path's ConnectFailed / ExchangeFailed)."""
    detail = _detail(exc)
    if isinstance(exc, ConnectFailed | ExchangeFailed):
        connect_failed = isinstance(exc, ConnectFailed)
        connect_timed_out = connect_failed and isinstance(exc.reason, TimeoutError)
        read_timed_out = isinstance(exc, ExchangeFailed) and exc.timed_out
    else:
        connect_failed = _is_connect_failure(exc)
        connect_timed_out = isinstance(exc, requests.ConnectTimeout)
        read_timed_out = isinstance(exc, requests.ReadTimeout) or any(
            isinstance(item, urllib3.exceptions.ReadTimeoutError) for item in _chain(exc)
        )
    if connect_failed:
        if connect_timed_out:
            detail = f"connect timeout after {connect_timeout:g}s"
        return NotSent(
            f"could not reach the API, nothing was sent ({detail})",
            account=account,
            endpoint=endpoint,
        )
    if read_timed_out:
        detail = f"no answer within read_timeout={read_timeout:g}s"
    return Ambiguous(
        f"the request was sent but its answer was lost ({detail})",
        account=account,
        endpoint=endpoint,
    )


def read_body(response: requests.Response, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit`` bytes (not read further)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=65_536):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
