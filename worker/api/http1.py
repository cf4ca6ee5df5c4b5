"""HTTP/1.1 on one socket: a request's bytes, and an answer read with its framing (RFC 9112).

The direct path's connections (worker/api/direct.py) used ``http.client``: about 110 us of
client CPU per GET here through the direct path as it was, about 90 us on a bare
``http.client`` connection, about 50 us on this module (benchmarks/http_exchange.py,
docs/benchmarks.md, issue 14). ``http.client`` builds the request header by header, wraps
every answer in a file object and parses its headers with the ``email`` package; an API
answer of a few hundred bytes needs none of that. What is kept
from it: the request line and header values are refused if they hold control characters (no
header injection through a value an API answered, such as a token), a ``Host`` header, and the
answer framing rules: ``Transfer-Encoding: chunked``, ``Content-Length``, or the body runs to
the connection's close; interim 1xx answers skipped; no body for 204 and 304; keep-alive unless
the server says ``Connection: close`` or speaks HTTP/1.0.

Errors are ``http.client``'s classes, so callers and their tests tell them apart as before:
``RemoteDisconnected`` (closed without an answer: a stale keep-alive connection),
``IncompleteRead`` (closed inside a body), ``BadStatusLine``/``HTTPException`` (not HTTP),
``TimeoutError`` from the socket.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from http.client import BadStatusLine, HTTPException, IncompleteRead, RemoteDisconnected

#: The largest answer head (status line and headers) read; an API's is under a kilobyte.
MAX_HEAD = 65_536
#: Bytes asked of the socket per read.
READ_SIZE = 65_536

# Control characters (but tab, allowed in header values) and DEL: one in a request line or a
# header would let a value end the line and add headers of its own.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NO_BODY_STATUSES = frozenset({204, 304})


def encode_request(
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str],
    body: bytes | None,
) -> bytes:
    """The request's bytes: request line, ``Host``, ``headers``, ``Content-Length`` when there is
    a body, the blank line, the body. Raises ValueError naming what holds a control character
    (never the value: it may be a credential)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if _CONTROL.search(lines[0]) or " " in target:
        raise ValueError("the request target holds a space or a control character")
    for name, value in headers.items():
        line = f"{name}: {value}"
        if _CONTROL.search(line) or not name or ":" in name or " " in name:
            raise ValueError(f"header {name!r} holds a control character or is not a name")
        lines.append(line)
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


def host_header(hostname: str, port: int, default_port: int) -> str:
    """The ``Host`` value: the name (an IPv6 literal in brackets), and the port unless it is the
    scheme's default."""
    name = f"[{hostname}]" if ":" in hostname else hostname
    return name if port == default_port else f"{name}:{port}"


@dataclass(frozen=True)
class Answer:
    """A complete answer: ``body`` is None when it was longer than the exchange's limit;
    ``reusable``: the connection may carry another request (keep-alive, the body read to its
    end, nothing read past it)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None
    reusable: bool


class AnswerReader:
    """Reads answers from one connected socket; bytes read past an answer are kept for the
    next read (an answer's head and body often come in one ``recv``)."""

    __slots__ = ("_buffer", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _more(self) -> bytes:
        chunk = self._sock.recv(READ_SIZE)
        if not chunk:
            return chunk
        self._buffer += chunk
        return chunk

    def read(self, limit: int, *, head_only: bool = False) -> Answer:
        """The next answer, at most ``limit`` bytes of its body (``head_only``: the answer to a
        HEAD request, which has none). Raises RemoteDisconnected when the server closes before
        an answer starts, IncompleteRead inside a body, HTTPException for what is not HTTP/1.x,
        and the socket's own errors (TimeoutError, ConnectionResetError...)."""
        while True:
            status, version, headers = self._read_head()
            if not 100 <= status < 200 or status == 101:
                break
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
        keep_alive = version == "HTTP/1.1"
        transfer_coding: str | None = None
        length: int | None = None
        for name, value in headers:
            lowered = name.lower()
            if lowered == "connection":
                tokens = {token.strip().lower() for token in value.split(",")}
                if "close" in tokens:
                    keep_alive = False
                elif "keep-alive" in tokens and version == "HTTP/1.0":
                    keep_alive = True
            elif lowered == "transfer-encoding":
                transfer_coding = value.rsplit(",", 1)[-1].strip().lower()
            elif lowered == "content-length":
                length = _content_length(value, length)
        if transfer_coding is not None:
            # Transfer-Encoding outranks Content-Length (RFC 9112, 6.3); and an answer with
            # both may be a smuggling attempt: its connection is not used again.
            if length is not None:
                keep_alive = False
            length = None
        if head_only or status in _NO_BODY_STATUSES or status == 101:
            # (A 101 would switch protocols: nothing paypoll asks for; the socket is dropped.)
            return Answer(status, headers, b"", keep_alive and not self._buffer and status != 101)
        if transfer_coding == "chunked":
            body = self._read_chunked(limit)
        elif transfer_coding is None and length is not None:
            body = self._read_length(length, limit)
        else:
            keep_alive = False
            body = self._read_to_close(limit)
        reusable = keep_alive and body is not None and not self._buffer
        return Answer(status, headers, body, reusable)

    def _read_head(self) -> tuple[int, str, list[tuple[str, str]]]:
        start = 0
        while (end := self._buffer.find(b"\r\n\r\n", start)) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise HTTPException(f"answer head longer than {MAX_HEAD} bytes")
            start = max(0, len(self._buffer) - 3)
            if not self._more():
                if self._buffer:
                    raise IncompleteRead(self._buffer)
                raise RemoteDisconnected("Remote end closed connection without response")
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise BadStatusLine(status_line[:80])
        headers: list[tuple[str, str]] = []
        for line in lines:
            if line[:1] in (" ", "\t") and headers:  # an obsolete folded continuation line
                name, value = headers[-1]
                headers[-1] = (name, f"{value} {line.strip()}")
                continue
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                # Not quoted: a header line may carry a credential (Set-Cookie, a token).
                raise HTTPException("malformed header line in the answer")
            headers.append((name, value.strip()))
        return int(code), version, headers

    def _take(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer only when the connection closed: IncompleteRead)."""
        while len(self._buffer) < size:
            if not self._more():
                raise IncompleteRead(self._buffer, size - len(self._buffer))
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _line(self) -> bytes:
        start = 0
        while (end := self._buffer.find(b"\r\n", start)) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise HTTPException("a chunk header or trailer line is too long")
            start = max(0, len(self._buffer) - 1)
            if not self._more():
                raise IncompleteRead(self._buffer)
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return line

    def _read_length(self, length: int, limit: int) -> bytes | None:
        if length > limit:
            return None  # not read: the connection is not reusable
        return self._take(length)

    def _read_chunked(self, limit: int) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            size_field = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise HTTPException("malformed chunk size in the answer") from None
            if size < 0:
                raise HTTPException("malformed chunk size in the answer")
            if size == 0:
                while self._line():  # trailer fields, up to the blank line
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                return None
            parts.append(self._take(size))
            if self._take(2) != b"\r\n":
                raise HTTPException("a chunk is not followed by CRLF")

    def _read_to_close(self, limit: int) -> bytes | None:
        while len(self._buffer) <= limit:
            if not self._more():
                data, self._buffer = self._buffer, b""
                return data
        return None


def _content_length(value: str, seen: int | None) -> int:
    values = {item.strip() for item in value.split(",")}
    if len(values) != 1 or not (only := values.pop()).isdigit():
        raise HTTPException("malformed Content-Length in the answer")
    length = int(only)
    if seen is not None and seen != length:
        raise HTTPException("conflicting Content-Length headers in the answer")
    return length
