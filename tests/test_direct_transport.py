"""The direct HTTP path (worker/api/direct.py): what the requests path promised, kept.

Real parts: the sandbox over a socket, the real limiter on a real Redis, the real ApiClient.
The error mapping (refused -> NotSent, dropped -> Ambiguous, read timeouts, huge bodies, a
server closing without an answer) is tests/test_api_client.py's, which runs on this path (its
clients are given no Session). Here: the send gate on a slow connect (the stand-in for a TLS
handshake, as in tests/test_send_gate.py), a refusing gate, keep-alive reuse, a proxy in the
environment taking the requests path, and TLS verified against the CA bundle, through a TLS
front (a thread relaying a TLS socket to the sandbox) with a certificate openssl makes.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.redis_server import free_port
from tests.sandbox_fixture import RunningSandbox, sandbox_factory
from worker import metrics
from worker.api import ApiClient
from worker.api.direct import (
    DirectHTTPConnection,
    DirectTransport,
    HTTPConnection,
    _LastCheckMixin,
    default_ssl_context,
)
from worker.api.send_gate import GateRefused
from worker.errors import ApiError, NotFound, NotSent, SlotTooFar
from worker.keys import Keys
from worker.ratelimit import RateLimiter
from worker.ratelimit.reservation import Reservation
from worker.settings import Account, Secret, Settings

__all__ = ["sandbox_factory"]

CLIENT_ID = "client-direct"
SECRET = "direct-secret-51c7"
CONNECT_DELAY = 0.080


class Recording(DirectHTTPConnection):
    """Counts the connections made (class-wide)."""

    made = 0

    def connect(self) -> None:
        type(self).made += 1
        super().connect()


class SlowConnect(DirectHTTPConnection):
    """A connection whose connect takes CONNECT_DELAY (a TLS handshake to the real API)."""

    def connect(self) -> None:
        time.sleep(CONNECT_DELAY)
        super().connect()


@pytest.fixture
def strict_sandbox(sandbox_factory: Callable[..., RunningSandbox]) -> RunningSandbox:
    return sandbox_factory(client=[f"{CLIENT_ID}:{SECRET}"], rate=5, limit_mode="sliding")


def make_client(
    url: str,
    redis_client: redis.Redis,
    key_prefix: str,
    transport: DirectTransport,
    account: str = "direct",
) -> ApiClient:
    settings = Settings(api_url=url, key_prefix=key_prefix).with_accounts(
        Account(account, CLIENT_ID, Secret(SECRET), rate=5.0)
    )
    limiter = RateLimiter(redis=redis_client, keys=Keys(key_prefix), max_wait=2.0)
    return ApiClient(settings=settings, redis=redis_client, limiter=limiter, transport=transport)


def test_calls_reuse_one_keep_alive_connection(
    strict_sandbox: RunningSandbox, redis_client: redis.Redis, key_prefix: str
) -> None:
    [payment_id] = strict_sandbox.seed(CLIENT_ID, 1)
    Recording.made = 0
    transport = DirectTransport(http_class=Recording)
    client = make_client(strict_sandbox.url, redis_client, key_prefix, transport)
    for _ in range(6):
        assert client.get_payment("direct", payment_id).id == payment_id
    # The token call and six GETs, one after the other: one connection for all seven.
    assert Recording.made == 1
    assert strict_sandbox.client_stats(CLIENT_ID)["total"] == 7
    transport.close()


def test_a_slow_new_connection_is_made_before_the_slot_not_after_it(
    strict_sandbox: RunningSandbox, redis_client: redis.Redis, key_prefix: str
) -> None:
    # tests/test_send_gate.py's run on the direct path: 13 GETs, the pooled connection dropped
    # before every sixth, so that call connects slowly and the five after it reuse it.
    transport = DirectTransport(http_class=SlowConnect)
    client = make_client(strict_sandbox.url, redis_client, key_prefix, transport, "slow")
    late_before = metrics.LIMITER_LATE.labels("slow")._value.get()
    client.tokens.get(client._settings.account("slow"))
    for call in range(13):
        if call % 6 == 0:
            transport.close()  # the next call makes a new connection
        with pytest.raises(ApiError) as caught:
            client.get_payment("slow", "no-such-payment")
        assert isinstance(caught.value, NotFound), caught.value
    stats = strict_sandbox.client_stats(CLIENT_ID)
    assert stats["rate_limited"] == 0 and stats["total"] == 14
    # The gate saw a slow connect eat into an idle key's "now" slot and took a fresh one.
    assert metrics.LIMITER_LATE.labels("slow")._value.get() - late_before >= 1
    transport.close()


class _StallBeforeWrite(HTTPConnection):
    """Sleeps ``stall_next`` seconds (once) right before its write: a thread losing the CPU
    (the GIL, a stolen vCPU) between the slot's last check and the write."""

    stall_next = 0.0

    def send(self, data: bytes) -> None:
        stall, type(self).stall_next = type(self).stall_next, 0.0
        if stall:
            time.sleep(stall)
        super().send(data)


class StalledWrite(_LastCheckMixin, _StallBeforeWrite):
    """The direct connection, its last check run before the stall."""


class NoFence(RateLimiter):
    """The limiter without its after-write fence: what a late write did before it."""

    def fence_late_send(self, booking: Reservation, rate: float) -> bool:
        return False


@pytest.mark.parametrize("fenced", [False, True])
def test_a_write_late_after_its_check_fences_the_key(
    sandbox_factory: Callable[..., RunningSandbox],
    redis_client: redis.Redis,
    key_prefix: str,
    fenced: bool,
) -> None:
    # Eight calls back to back on one key, the strict sliding limit: the third is written
    # 60 ms after its last check passed. The fifth call after it, on time, is then 965 ms
    # after it: without the fence a 429 (the premise, so this test can fail); with it none.
    sandbox = sandbox_factory(client=[f"{CLIENT_ID}:{SECRET}"], rate=5, limit_mode="sliding")
    account = f"stall-{fenced}"
    settings = Settings(api_url=sandbox.url, key_prefix=key_prefix).with_accounts(
        Account(account, CLIENT_ID, Secret(SECRET), rate=5.0)
    )
    limiter_class = RateLimiter if fenced else NoFence
    limiter = limiter_class(redis=redis_client, keys=Keys(key_prefix), max_wait=2.0)
    transport = DirectTransport(http_class=StalledWrite)
    client = ApiClient(settings=settings, redis=redis_client, limiter=limiter, transport=transport)
    fences_before = metrics.LIMITER_LATE_SENDS.labels(account)._value.get()
    client.tokens.get(settings.account(account))  # call 1
    outcomes = []
    for call in range(7):  # calls 2 to 8
        StalledWrite.stall_next = 0.060 if call == 1 else 0.0
        try:
            client.get_payment(account, "no-such-payment")
        except ApiError as exc:
            outcomes.append(type(exc).__name__)
    stats = sandbox.client_stats(CLIENT_ID)
    fences = metrics.LIMITER_LATE_SENDS.labels(account)._value.get() - fences_before
    if fenced:
        assert stats["rate_limited"] == 0, (stats, outcomes)
        assert outcomes == ["NotFound"] * 7
        assert fences == 1  # the stalled call only: the others were written on time
    else:
        assert stats["rate_limited"] >= 1, (stats, outcomes)
        assert fences == 0
    transport.close()


class BrokenFence(RateLimiter):
    """A limiter whose after-write step fails on every call."""

    def fence_late_send(self, booking: Reservation, rate: float) -> bool:
        raise RuntimeError("the fence broke")


def test_a_failing_fence_does_not_fail_a_call_already_written(
    strict_sandbox: RunningSandbox, redis_client: redis.Redis, key_prefix: str
) -> None:
    # The step after the write runs once the request is out: its failure must not make the
    # exchange fail (a create would then be ambiguous).
    [payment_id] = strict_sandbox.seed(CLIENT_ID, 1)
    settings = Settings(api_url=strict_sandbox.url, key_prefix=key_prefix).with_accounts(
        Account("broken", CLIENT_ID, Secret(SECRET), rate=5.0)
    )
    limiter = BrokenFence(redis=redis_client, keys=Keys(key_prefix), max_wait=2.0)
    transport = DirectTransport()
    client = ApiClient(settings=settings, redis=redis_client, limiter=limiter, transport=transport)
    assert [client.get_payment("broken", payment_id).id for _ in range(2)] == [payment_id] * 2
    assert strict_sandbox.client_stats(CLIENT_ID)["total"] == 3  # the token call and two GETs
    transport.close()


def test_a_refusing_gate_sends_nothing_and_keeps_the_connection(
    strict_sandbox: RunningSandbox,
) -> None:
    Recording.made = 0
    transport = DirectTransport(http_class=Recording)
    url = f"{strict_sandbox.url}/payments/request/x"
    connected: list[bool] = []

    def refuse() -> None:
        connected.append(Recording.made == 1)
        raise SlotTooFar("acme", 1.5)

    def exchange(gate: Callable[[], None] | None) -> int:
        answer = transport.exchange(
            "GET",
            url,
            headers={},
            body=None,
            gate=gate,
            connect_timeout=5,
            read_timeout=5,
            limit=1000,
        )
        return answer.status

    with pytest.raises(GateRefused) as caught:
        exchange(refuse)
    assert connected == [True] and isinstance(caught.value.reason, SlotTooFar)
    assert strict_sandbox.stats(payments=False)["clients"] == {}  # nothing reached it
    # The same connection carries the next request: nothing half-written was left on it.
    assert exchange(None) == 401 and Recording.made == 1
    transport.close()


def test_a_proxy_in_the_environment_takes_the_requests_path(
    strict_sandbox: RunningSandbox,
    redis_client: redis.Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A proxy nobody listens on: the requests path tries it and nothing is sent; the direct
    # path would have reached the sandbox.
    Recording.made = 0
    client = make_client(
        strict_sandbox.url, redis_client, key_prefix, DirectTransport(http_class=Recording)
    )
    with monkeypatch.context() as env:
        env.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
        env.delenv("NO_PROXY", raising=False)
        env.delenv("no_proxy", raising=False)
        with pytest.raises(NotSent) as caught:
            client.get_payment("direct", "pr_x")
    assert "ConnectionRefusedError" in str(caught.value)
    assert Recording.made == 0
    assert strict_sandbox.stats(payments=False)["clients"] == {}


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    # No spaces inside an argument, so the command splits on them.
    command = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost"
    names = "subjectAltName=IP:127.0.0.1,DNS:localhost"
    subprocess.run(
        [*command.split(), "-addext", names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_front(strict_sandbox: RunningSandbox, certificate: tuple[Path, Path]) -> Iterator[str]:
    """https://127.0.0.1:PORT, relaying each TLS connection's bytes to the sandbox."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for side in (source, sink):
                side.close()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                raw.settimeout(5)
                secure = context.wrap_socket(raw, server_side=True)
                secure.settimeout(None)
            except (OSError, ssl.SSLError):
                raw.close()  # a client that refused our certificate
                continue
            upstream = socket.create_connection(("127.0.0.1", strict_sandbox.port))
            for source, sink in ((secure, upstream), (upstream, secure)):
                threading.Thread(target=pump, args=(source, sink), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    listener.close()


def test_https_is_verified_against_the_ca_bundle(
    tls_front: str,
    strict_sandbox: RunningSandbox,
    certificate: tuple[Path, Path],
    redis_client: redis.Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [payment_id] = strict_sandbox.seed(CLIENT_ID, 1)
    # The default trust (certifi's bundle) does not know the self-signed certificate: the
    # handshake fails, nothing is sent.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    untrusting = make_client(tls_front, redis_client, key_prefix, DirectTransport())
    with pytest.raises(NotSent) as caught:
        untrusting.get_payment("direct", payment_id)
    assert "SSLCertVerificationError" in str(caught.value)
    assert strict_sandbox.stats(payments=False)["clients"] == {}
    # Trusting it as requests would (REQUESTS_CA_BUNDLE): the calls go through, on TLS.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    transport = DirectTransport()
    trusting = make_client(tls_front, redis_client, key_prefix, transport)
    assert trusting.get_payment("direct", payment_id).id == payment_id
    assert strict_sandbox.client_stats(CLIENT_ID)["total"] == 2  # the token, the GET
    assert default_ssl_context().verify_mode == ssl.CERT_REQUIRED
    transport.close()
