"""HTTP transport of the sandbox: stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive.

Routing only; the behaviour lives in ``state.Sandbox``. Each answer is written with ONE send
(status line, headers and body together) and Nagle's algorithm is off: with the stdlib's
separate header/body writes and Nagle on, every answer stalls ~40 ms on delayed ACKs
(design.md, "Other facts measured here").
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from worker.sandbox.answers import Answer, error_body, json_answer
from worker.sandbox.config import SandboxConfig
from worker.sandbox.state import TOKEN_ROUTE, Sandbox

# Payment paths: the OpenAPI reference's spelling and the FAQ's (api-contract.md).
PAYMENT_PREFIXES = ("/payments/request", "/payment/request")
MAX_BODY = 1 << 20  # bytes; larger bodies are refused with 413
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python names it 3.12+
SCM_TIMESTAMPNS = getattr(socket, "SCM_TIMESTAMPNS", SO_TIMESTAMPNS)
_TIMESPEC = struct.Struct("qq")  # struct timespec: seconds, nanoseconds


class SandboxServer(ThreadingHTTPServer):
    """The listening server; one thread per connection, threads die with the process."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # a burst of connecting test clients must not be refused

    def server_bind(self) -> None:
        super().server_bind()
        # Set on the listening socket, the option is inherited by every accepted connection
        # from its creation (Linux copies socket flags on accept), so the first request on a
        # new connection is stamped when it arrived, not when a thread got round to setup().
        with contextlib.suppress(OSError, AttributeError):
            self.socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__((config.host, config.port), SandboxHandler)
        host, port = self.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        self.url = f"http://{host_text}:{port}"
        self.sandbox = Sandbox(config, base_url=self.url)
        self.log_requests = config.log_requests


class SandboxHandler(BaseHTTPRequestHandler):
    """Routes one request to the sandbox and writes its answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "paypoll-sandbox"
    server: SandboxServer

    arrived: float = 0.0
    _kernel_arrival: float | None = None
    _kernel_stamps = False

    def setup(self) -> None:
        super().setup()
        # Ask the kernel to stamp each received packet with the wall clock (Linux).
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self._kernel_stamps = True
        except (OSError, AttributeError):
            self._kernel_stamps = False

    def handle_one_request(self) -> None:
        self._kernel_arrival = self._peek_arrival() if self._kernel_stamps else None
        super().handle_one_request()

    def _peek_arrival(self) -> float | None:
        """When the next request's first bytes reached this socket (kernel timestamp), read
        without consuming them; None when unknown. Clients of this API never pipeline, so
        the buffered reader holds nothing of the next request when this blocks for it."""
        try:
            _, ancillary, _, _ = self.connection.recvmsg(
                1, socket.CMSG_SPACE(_TIMESPEC.size), socket.MSG_PEEK
            )
        except OSError:
            return None
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
                seconds, nanos = _TIMESPEC.unpack(data[: _TIMESPEC.size])
                return float(seconds + nanos / 1e9)
        return None

    def parse_request(self) -> bool:
        # A request's arrival time: when its bytes reached the socket (kernel timestamp), else
        # the moment its request line was read; never when the parsing, the state lock or a
        # starved CPU let this emulator get round to it. The rate limit judges when the client
        # sent a request.
        self.arrived = self._kernel_arrival or time.time()
        return super().parse_request()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
            if body is None:
                return
            answer = self._route(method, body)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            answer = json_answer(500, error_body("sandbox_bug", "Unexpected sandbox error"))
        if answer.latency > 0:
            time.sleep(answer.latency)
        if answer.drop:
            self._abort()
            return
        self._send(answer)

    def _read_body(self) -> bytes | None:
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self._send(json_answer(411, error_body("length_required", "Send Content-Length")))
            self.close_connection = True
            return None
        try:
            length = int(length_text) if length_text else 0
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._send(json_answer(413, error_body("bad_length", "Bad Content-Length")))
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _route(self, method: str, body: bytes) -> Answer:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        sandbox = self.server.sandbox
        if path.startswith("/_admin/"):
            return self._admin(method, path, parts.query, body)
        authorization = self.headers.get("Authorization", "")
        if path == "/oauth/token":
            if method != "POST":
                return _not_allowed("POST")
            return sandbox.request(
                "token",
                TOKEN_ROUTE,
                authorization=authorization,
                content_type=self.headers.get("Content-Type", ""),
                body=body,
                arrived=self.arrived,
            )
        for prefix in PAYMENT_PREFIXES:
            if path == prefix:
                if method != "POST":
                    return _not_allowed("POST")
                return sandbox.request(
                    "create",
                    f"POST {prefix}",
                    authorization=authorization,
                    content_type=self.headers.get("Content-Type", ""),
                    body=body,
                    arrived=self.arrived,
                )
            if path.startswith(prefix + "/") and path.count("/") == 3:
                if method != "GET":
                    return _not_allowed("GET")
                return sandbox.request(
                    "get",
                    f"GET {prefix}/{{id}}",
                    authorization=authorization,
                    content_type="",
                    body=b"",
                    payment_id=path.rsplit("/", 1)[1],
                    arrived=self.arrived,
                )
        if method == "GET" and path.startswith("/pay/"):
            return sandbox.hosted_page(path.rsplit("/", 1)[1])
        return json_answer(404, error_body("not_found", f"No route {method} {path}"))

    def _admin(self, method: str, path: str, query: str, body: bytes) -> Answer:
        sandbox = self.server.sandbox
        if path == "/_admin/health":
            return json_answer(200, {"ok": True})
        if path == "/_admin/stats":
            if method != "GET":
                return _not_allowed("GET")
            params = parse_qs(query)
            return json_answer(
                200,
                sandbox.stats(
                    payments=params.get("payments", ["1"])[0] not in ("0", "false"),
                    times=params.get("times", ["0"])[0] in ("1", "true"),
                ),
            )
        if method != "POST":
            return _not_allowed("POST")
        try:
            data = json.loads(body) if body.strip() else {}
            if not isinstance(data, dict):
                raise ValueError("body must be a JSON object")
            if path == "/_admin/faults":
                return json_answer(200, sandbox.set_faults(data))
            if path == "/_admin/reset":
                sandbox.reset(keep_faults=bool(data.get("keep_faults", False)))
                return json_answer(200, {"reset": True})
            if path == "/_admin/seed":
                return json_answer(200, {"ids": _seed(sandbox, data)})
            if path.startswith("/_admin/payments/"):
                payment_id = path.rsplit("/", 1)[1]
                try:
                    view = sandbox.force_status(payment_id, str(data.get("status")))
                except KeyError:
                    return json_answer(404, error_body("not_found", "Unknown payment"))
                return json_answer(200, view)
        except ValueError as exc:
            return json_answer(400, error_body("invalid_admin_request", str(exc)))
        return json_answer(404, error_body("not_found", f"No admin route {path}"))

    def _send(self, answer: Answer) -> None:
        """Write the whole answer in one send (see the module docstring)."""
        reason = HTTPStatus(answer.status).phrase if answer.status in _STATUSES else ""
        lines = [
            f"HTTP/1.1 {answer.status} {reason}",
            f"Content-Type: {answer.content_type}",
            f"Content-Length: {len(answer.body)}",
        ]
        lines += [f"{name}: {value}" for name, value in answer.headers]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + answer.body)
        if self.server.log_requests:
            self.log_request(answer.status, len(answer.body))

    def _abort(self) -> None:
        """Close the connection at once with no answer (RST, like a dropped network path)."""
        self.close_connection = True
        sock: socket.socket = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass


_STATUSES = {s.value for s in HTTPStatus}


def _not_allowed(allowed: str) -> Answer:
    answer = json_answer(405, error_body("method_not_allowed", f"Use {allowed}"))
    answer.headers.append(("Allow", allowed))
    return answer


def _seed(sandbox: Sandbox, data: dict[str, Any]) -> list[str]:
    """``POST /_admin/seed``: the body's fields checked, then Sandbox.seed."""
    client_id, count, prefix = data.get("client_id"), data.get("count"), data.get("prefix", "")
    if not isinstance(client_id, str):
        raise ValueError("client_id: a string is required")
    if not isinstance(count, int) or isinstance(count, bool):
        raise ValueError("count: an integer is required")
    if not isinstance(prefix, str):
        raise ValueError("prefix: must be a string")
    return sandbox.seed(client_id, count, prefix)


def make_server(config: SandboxConfig) -> SandboxServer:
    """A bound (not yet serving) sandbox server; ``.url`` tells the port picked for port 0."""
    return SandboxServer(config)
