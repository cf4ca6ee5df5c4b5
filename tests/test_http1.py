"""HTTP/1.1 framing of the direct path (worker/api/http1.py, worker/api/direct.py).

The sandbox answers every request one way (Content-Length, keep-alive); the real API, or a
proxy in front of it, may frame answers otherwise. So these tests run the DirectTransport over
real sockets against a scripted server: a thread that reads each request and writes back the
bytes a test gives it, and records what it received. tests/test_direct_transport.py runs the
same transport against the sandbox.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.waiting import wait_until
from worker.api.direct import ConnectFailed, DirectTransport, ExchangeFailed
from worker.api.http1 import encode_request, host_header

BODY = b'{"id":"pr_1","status":"pending"}'


@dataclass
class Scripted:
    """A server on 127.0.0.1 that answers the n-th request (over all connections) with
    ``answers[n]``, then closes the connection when ``close_after[n]`` is set."""

    answers: list[bytes]
    close_after: set[int] = field(default_factory=set)
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed: int = 0  # connections this server has closed
    port: int = 0

    def serve(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self._answer_each(conn)
        finally:
            conn.close()
            self.closed += 1

    def _answer_each(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += conn.recv(65536)
            body, buffer = buffer[:length], buffer[length:]
            index = len(self.requests)
            self.requests.append(head + b"\r\n\r\n" + body)
            conn.sendall(self.answers[index])
            if index in self.close_after:
                return


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted(answers=[])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    server.port = listener.getsockname()[1]
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(listener, stop), daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(timeout=5)
    listener.close()


def get(
    transport: DirectTransport, port: int, *, limit: int = 1000
) -> tuple[int, bytes | None, dict[str, str], bool]:
    """GET on ``transport``: (status, body, headers, reusable)."""
    answer = transport.exchange(
        "GET",
        f"http://127.0.0.1:{port}/payments/request/pr_1?x=1",
        headers={"Authorization": "Bearer tok-123456", "Accept": "application/json"},
        body=None,
        gate=None,
        connect_timeout=2,
        read_timeout=2,
        limit=limit,
    )
    return answer.status, answer.body, dict(answer.headers), answer.reusable


def length_answer(body: bytes = BODY, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_the_request_is_one_well_formed_message(scripted: Scripted) -> None:
    scripted.answers = [length_answer()]
    transport = DirectTransport(user_agent="paypoll/test")
    assert get(transport, scripted.port)[:2] == (200, BODY)
    lines = scripted.requests[0].decode().split("\r\n")
    assert lines[0] == "GET /payments/request/pr_1?x=1 HTTP/1.1"
    assert lines[1] == f"Host: 127.0.0.1:{scripted.port}"
    assert set(lines[2:-2]) == {
        "User-Agent: paypoll/test",
        "Accept-Encoding: identity",
        "Authorization: Bearer tok-123456",
        "Accept: application/json",
    }
    assert lines[-2:] == ["", ""]
    transport.close()


def test_a_post_body_goes_with_its_length() -> None:
    request = encode_request("POST", "/t", "api.example", {"A": "b"}, b"grant=1")
    assert (
        request
        == b"POST /t HTTP/1.1\r\nHost: api.example\r\nA: b\r\nContent-Length: 7\r\n\r\ngrant=1"
    )
    assert host_header("::1", 8443, 443) == "[::1]:8443"
    assert host_header("api.example", 443, 443) == "api.example"


def test_a_control_character_in_a_header_is_refused_without_its_value() -> None:
    with pytest.raises(ValueError, match="header 'Authorization'") as caught:
        encode_request("GET", "/", "h", {"Authorization": "Bearer x\r\nX-Evil: 1"}, None)
    assert "Authorization" in str(caught.value) and "Evil" not in str(caught.value)
    with pytest.raises(ValueError, match="request target"):
        encode_request("GET", "/a b", "h", {}, None)


def test_an_injected_header_sends_nothing(scripted: Scripted) -> None:
    transport = DirectTransport()
    with pytest.raises(ConnectFailed):
        transport.exchange(
            "GET",
            f"http://127.0.0.1:{scripted.port}/x",
            headers={"Authorization": "Bearer a\nX: y"},
            body=None,
            gate=None,
            connect_timeout=2,
            read_timeout=2,
            limit=100,
        )
    assert scripted.connections == 0 and scripted.requests == []


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        # chunked, with a chunk extension and a trailer
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5;ext=1\r\n{"id"\r\n1b\r\n:"pr_1","status":"pending"}\r\n0\r\nX-T: 1\r\n\r\n',
            BODY,
        ),
        # an interim 100 Continue before the answer
        (b"HTTP/1.1 100 Continue\r\n\r\n" + length_answer(), BODY),
        # a header folded over two lines (obsolete, still to be read)
        (length_answer(extra="X-Folded: a\r\n  b\r\n"), BODY),
        # no body by status
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", b""),
    ],
    ids=["chunked", "100-continue", "folded", "204", "304"],
)
def test_answers_framed_every_keep_alive_way(
    scripted: Scripted, answer: bytes, body: bytes
) -> None:
    scripted.answers = [answer, length_answer()]
    transport = DirectTransport()
    _, got, headers, reusable = get(transport, scripted.port)
    assert got == body and reusable
    if "X-Folded" in headers:
        assert headers["X-Folded"] == "a b"
    # The connection carries the next request: the framing consumed the answer exactly.
    assert get(transport, scripted.port)[:2] == (200, BODY)
    assert scripted.connections == 1
    transport.close()


@pytest.mark.parametrize(
    ("answer", "close"),
    [
        (length_answer(extra="Connection: close\r\n"), True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY, True),
        (b"HTTP/1.1 200 OK\r\n\r\n" + BODY, True),  # no length: the body runs to the close
        # both framings: Transfer-Encoding wins, the connection is not trusted again
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n",
            False,
        ),
        # bytes nobody asked for after the answer
        (length_answer() + b"HTTP/1.1 200 OK\r\n", False),
    ],
    ids=["connection-close", "http-1.0", "to-close", "te-and-cl", "trailing-bytes"],
)
def test_answers_after_which_the_connection_is_dropped(
    scripted: Scripted, answer: bytes, close: bool
) -> None:
    scripted.answers = [answer, length_answer()]
    scripted.close_after = {0} if close else set()
    transport = DirectTransport()
    status, body, _, reusable = get(transport, scripted.port)
    assert (status, body, reusable) == (200, BODY, False)
    assert get(transport, scripted.port)[:2] == (200, BODY)
    assert scripted.connections == 2
    transport.close()


def test_a_body_over_the_limit_is_not_read_and_not_kept(scripted: Scripted) -> None:
    big = b"x" * 5000
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n" + big + b"\r\n0\r\n\r\n"
    )
    scripted.answers = [length_answer(big), chunked, length_answer()]
    transport = DirectTransport()
    assert get(transport, scripted.port, limit=1000)[1:] == (
        None,
        {"Content-Length": "5000"},
        False,
    )
    assert get(transport, scripted.port, limit=1000)[1] is None
    assert get(transport, scripted.port)[:2] == (200, BODY)
    assert scripted.connections == 3
    transport.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"",  # closed without a byte
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"id"',  # closed inside the body
        b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\nBearer tok-secret-999 and no colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["closed", "short-body", "not-http", "bad-header", "bad-length", "bad-chunk"],
)
def test_a_broken_answer_is_an_exchange_failure(scripted: Scripted, answer: bytes) -> None:
    scripted.answers = [answer]
    scripted.close_after = {0}
    transport = DirectTransport()
    with pytest.raises(ExchangeFailed) as caught:
        get(transport, scripted.port)
    assert not caught.value.timed_out
    # What the answer held is not quoted in the error (a header line may carry a credential).
    assert "tok-secret" not in f"{caught.value!r} {caught.value.reason!r} {caught.value.reason}"
    transport.close()


def test_a_silent_server_is_a_read_timeout(scripted: Scripted) -> None:
    scripted.answers = [b"HTTP/1.1 200 OK\r\n"]  # the head never ends
    transport = DirectTransport()
    with pytest.raises(ExchangeFailed) as caught:
        transport.exchange(
            "GET",
            f"http://127.0.0.1:{scripted.port}/x",
            headers={},
            body=None,
            gate=None,
            connect_timeout=2,
            read_timeout=0.2,
            limit=100,
        )
    assert caught.value.timed_out
    transport.close()


def test_a_pooled_connection_the_server_closed_is_replaced_before_the_write(
    scripted: Scripted,
) -> None:
    # The server answers and closes without saying so (a keep-alive timeout). The next request
    # goes out on a new connection instead of failing on the dead one.
    scripted.answers = [length_answer(), length_answer()]
    scripted.close_after = {0}
    transport = DirectTransport()
    assert get(transport, scripted.port)[3] is True  # kept: nothing said it would close
    wait_until(lambda: scripted.closed == 1, timeout=5, what="the server to close")
    assert get(transport, scripted.port)[:2] == (200, BODY)
    assert scripted.connections == 2 and len(scripted.requests) == 2
    transport.close()
