"""The ratelimit benchmark's caller: one POST /oauth/token per granted slot, on a keep-alive
connection, through ``requests`` or a light one-send client (see ``TokenCaller``)."""

from __future__ import annotations

import base64
import http.client
import socket
from urllib.parse import urlsplit

import requests

SECRET = "bench-secret"


class TokenCaller:
    """Sends the benchmark's call (POST /oauth/token, Basic auth) on one keep-alive connection.

    ``http="requests"`` goes through a ``requests.Session`` like the product's API client
    (urllib3 writes the headers and the body in two sends, with TCP_NODELAY); ``http="light"``
    writes pre-encoded request bytes in ONE send on a TCP_NODELAY socket and parses the answer
    with ``http.client`` (a third of the CPU), so that on a small host the limiters are measured
    rather than the HTTP library. Every limiter in a run uses the same kind of caller.

    Why one send: http.client writes headers and body separately and leaves Nagle on, so the
    body waits for the server's delayed ACK (up to 40 ms on Linux) and the request is complete
    at the server that much later than its slot.
    """

    def __init__(self, url: str, http: str) -> None:
        self.url = url
        self.session = requests.Session() if http == "requests" else None
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.sock: socket.socket | None = None
        self.requests: dict[str, bytes] = {}

    def _request(self, account: str) -> bytes:
        if account not in self.requests:
            basic = base64.b64encode(f"{account}:{SECRET}".encode()).decode()
            body = "grant_type=client_credentials"
            self.requests[account] = (
                f"POST /oauth/token HTTP/1.1\r\nHost: {self.address[0]}:{self.address[1]}\r\n"
                f"Authorization: Basic {basic}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        return self.requests[account]

    def post(self, account: str) -> tuple[int, float | None]:
        """Send one call for ``account``; return its status and Retry-After (None: absent)."""
        if self.session is not None:
            response = self.session.post(
                f"{self.url}/oauth/token",
                auth=(account, SECRET),
                data={"grant_type": "client_credentials"},
                timeout=10,
            )
            retry = response.headers.get("Retry-After")
            return response.status_code, None if retry is None else float(retry)
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        self.sock.sendall(self._request(account))
        # Keep-alive without pipelining: the buffered reader can only hold this one answer.
        answer = http.client.HTTPResponse(self.sock)
        answer.begin()
        answer.read()
        if answer.will_close:
            self.close()
        retry = answer.getheader("Retry-After")
        return answer.status, None if retry is None else float(retry)

    def connect(self) -> None:
        """Open the keep-alive connection now (before any slot is taken), as the product's
        client does: a connect inside a slot would make that call late by the handshake."""
        if self.session is not None:
            self.session.get(f"{self.url}/_admin/health", timeout=10).close()
        elif self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
