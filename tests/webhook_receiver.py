"""A real HTTP receiver of webhooks for the tests: verifies each signature with the
``standardwebhooks`` package and records what arrived; can be taken down, made to fail a share
of requests, answer 410, or hang."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook

from tests.redis_server import free_port


@dataclass
class Received:
    """One request the receiver answered 2xx."""

    webhook_id: str
    payload: dict[str, Any]
    at: float  # when it arrived (time.time())


@dataclass
class WebhookReceiver:
    """Serves on 127.0.0.1:``port`` while :meth:`up`; ``url`` stays the same across downs."""

    secret: str
    port: int = field(default_factory=free_port)
    fail_share: float = 0.0  # answer 500 to this share of requests
    status: int = 204  # what a successful request gets (410 to make the endpoint go away)
    hang: float = 0.0  # seconds to sleep before answering (a slow endpoint)
    seed: int = 1
    received: list[Received] = field(default_factory=list)
    refused: int = 0  # requests answered with an error status
    bad_signatures: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._verifier = Webhook(self.secret)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver._handle(self, body)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server

    def down(self) -> None:
        """Stop listening: connections are refused until :meth:`up`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        if self.hang:
            time.sleep(self.hang)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        try:
            payload = self._verifier.verify(body, headers)
        except Exception:
            with self._lock:
                self.bad_signatures += 1
            handler.send_response(400)
            handler.end_headers()
            return
        with self._lock:
            failing = self._rng.random() < self.fail_share
            status = 500 if failing else self.status
            if 200 <= status < 300:
                self.received.append(Received(headers["webhook-id"], payload, time.time()))
            else:
                self.refused += 1
        handler.send_response(status)
        handler.send_header("content-length", "0")
        handler.end_headers()

    def ids(self) -> list[str]:
        with self._lock:
            return [r.webhook_id for r in self.received]

    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.payload for r in self.received]


@contextlib.contextmanager
def running_receiver(secret: str, **options: Any) -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(secret=secret, **options)
    receiver.up()
    try:
        yield receiver
    finally:
        receiver.down()


def new_secret() -> str:
    """A fresh ``whsec_`` secret of 32 random bytes."""
    import base64
    import os

    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def as_json(received: list[Received]) -> str:
    return json.dumps([r.payload for r in received])
