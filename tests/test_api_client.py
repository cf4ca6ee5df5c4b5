"""ApiClient against the real sandbox over a socket, and real Redis for the token cache.

Every error class is produced by a real answer (or a real socket), never by a mock.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import structlog
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redis_server import free_port
from tests.sandbox_fixture import RunningSandbox, sandbox_factory
from tests.waiting import wait_until
from worker.api import ApiClient, MalformedCreateResponse, PaymentRequest
from worker.api.client import MAX_BODY
from worker.api.limiting import UnlimitedLimiter, WaitForSlot
from worker.errors import (
    Ambiguous,
    ApiError,
    CredentialsRefused,
    MalformedResponse,
    NotFound,
    NotSent,
    PaypollError,
    RateLimited,
    RejectedInput,
    ServerError,
    SlotTooFar,
    Unauthorized,
)
from worker.keys import Keys
from worker.logs import configure_logging
from worker.ratelimit import RateLimiter
from worker.settings import Account, Secret, Settings

__all__ = ["sandbox_factory"]  # the fixture, imported for the tests below

CLIENT_ID = "client-acme"
SECRET = "sandbox-secret-5f2c9e1d7a"
BACK = "https://shop.test/thanks"


class RecordingLimiter:
    """A Limiter that grants at once and remembers every call (a real object, no mock)."""

    def __init__(self, far: bool = False) -> None:
        self.far = far
        self.acquired: list[tuple[str, float, float | None]] = []
        self.holds: list[float | None] = []  # the hold passed with each booking
        self.penalties: list[tuple[str, float | None]] = []

    def book(
        self,
        account: str,
        rate: float,
        *,
        max_wait: float | None = None,
        hold: float | None = None,
    ) -> WaitForSlot:
        if self.far:
            raise SlotTooFar(account, 2.5)
        self.acquired.append((account, rate, max_wait))
        self.holds.append(hold)
        return UnlimitedLimiter().book(account, rate)

    def penalize(self, account: str, retry_after: float | None) -> float:
        self.penalties.append((account, retry_after))
        return retry_after or 0.0


Factory = Callable[..., RunningSandbox]


@pytest.fixture
def make_client(
    redis_client: redis.Redis, key_prefix: str
) -> Callable[..., tuple[ApiClient, RecordingLimiter]]:
    """Build a client for a sandbox URL, with settings overrides and a recording limiter."""

    def make(
        url: str, *, secret: str = SECRET, limiter: Any = None, **overrides: Any
    ) -> tuple[ApiClient, RecordingLimiter]:
        settings = Settings(api_url=url, key_prefix=key_prefix, **overrides).with_accounts(
            Account("acme", CLIENT_ID, Secret(secret), rate=7.0)
        )
        recorder = RecordingLimiter()
        client = ApiClient(
            settings=settings,
            redis=redis_client,
            limiter=limiter if limiter is not None else recorder,
        )
        return client, recorder

    return make


def _start(factory: Factory, **options: Any) -> RunningSandbox:
    options.setdefault("rate", 1000)
    return factory(client=[f"{CLIENT_ID}:{SECRET}"], **options)


def _create(client: ApiClient, **kwargs: Any) -> PaymentRequest:
    values: dict[str, Any] = {"amount": "10", "currency": "USD", "redirect_url": BACK}
    values.update(kwargs)
    return client.create_payment("acme", **values)


# --- success --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/payments/request", "/payment/request"])
def test_create_and_get_on_both_paths(
    sandbox_factory: Factory, make_client: Callable[..., Any], path: str
) -> None:
    sandbox = _start(sandbox_factory)
    client, limiter = make_client(sandbox.url, payments_path=path)
    created = _create(client, reference_id="order-1")
    assert created.id
    assert created.status == "pending"
    assert created.reference_id == "order-1"
    assert created.redirect_url == BACK
    assert created.url is not None
    assert created.id in created.url
    assert created.extra == {"amount": "10", "currency": "USD"}
    fetched = client.get_payment("acme", created.id, max_wait=0.5)
    assert fetched.id == created.id
    requests_seen = sandbox.client_stats(CLIENT_ID)["requests"]
    assert requests_seen == {
        "POST /oauth/token": {"200": 1},
        f"POST {path}": {"200": 1},
        f"GET {path}/{{id}}": {"200": 1},
    }
    # Every HTTP call, the token call included, took a limiter slot first.
    assert limiter.acquired == [("acme", 7.0, None), ("acme", 7.0, None), ("acme", 7.0, 0.5)]


def test_terminal_and_unknown_statuses_pass_through(
    sandbox_factory: Factory, make_client: Callable[..., Any]
) -> None:
    sandbox = _start(sandbox_factory, unknown_status=1.0, pay_after="1.5:1.5")
    client, _ = make_client(sandbox.url)
    created = _create(client)
    seen = wait_until(
        lambda: (p := client.get_payment("acme", created.id)).status != "pending" and p,
        timeout=5,
        interval=0.05,
        what="the undocumented status",
    )
    assert seen.status == "processing"
    assert not seen.is_known_status
    assert not seen.is_terminal
    sandbox.force_status(created.id, "cancelled")
    final = client.get_payment("acme", created.id)
    assert final.status == "cancelled"
    assert final.is_terminal


# --- answers that are errors ------------------------------------------------------------------


def test_400_rejected_input(sandbox_factory: Factory, make_client: Callable[..., Any]) -> None:
    sandbox = _start(sandbox_factory)
    client, _ = make_client(sandbox.url)
    with pytest.raises(RejectedInput) as caught:
        _create(client, currency="EUR", amount="-3")
    exc = caught.value
    assert (exc.status, exc.account, exc.endpoint) == (400, "acme", "create")
    assert set(exc.validation_errors) == {"currency", "amount"}
    assert "USD" in exc.validation_errors["currency"]
    assert exc.code
    assert "currency" in exc.message
    assert not exc.retry_safe


def test_422_rejected_input(sandbox_factory: Factory, make_client: Callable[..., Any]) -> None:
    sandbox = _start(sandbox_factory, max_amount=100)
    client, _ = make_client(sandbox.url)
    with pytest.raises(RejectedInput) as caught:
        _create(client, amount="500")
    assert caught.value.status == 422
    assert sandbox.stats()["payments_count"] == 0


def test_404_not_found(sandbox_factory: Factory, make_client: Callable[..., Any]) -> None:
    sandbox = _start(sandbox_factory)
    client, _ = make_client(sandbox.url)
    with pytest.raises(NotFound) as caught:
        client.get_payment("acme", "pr_doesnotexist")
    assert (caught.value.status, caught.value.endpoint) == (404, "get")


def _token_failures(account: str, reason: str) -> float:
    """This process's paypoll_token_failures_total{account, reason} (0 when absent)."""
    labels = {"account": account, "reason": reason}
    return REGISTRY.get_sample_value("paypoll_token_failures_total", labels) or 0.0


def test_403_bad_secret_is_credentials_refused(
    sandbox_factory: Factory, make_client: Callable[..., Any], redis_client: redis.Redis
) -> None:
    sandbox = _start(sandbox_factory)
    wrong = "wrong-secret-a1b2c3d4e5"
    client, _ = make_client(sandbox.url, secret=wrong)
    before = _token_failures("acme", "403")
    with pytest.raises(CredentialsRefused) as caught:
        _create(client)
    exc = caught.value
    # Counted for the dashboard and PaypollCredentialsRefused (issue 15: it never was).
    assert _token_failures("acme", "403") == before + 1
    assert (exc.status, exc.endpoint, exc.account) == (403, "token", "acme")
    assert wrong not in str(exc)
    assert wrong not in repr(exc)
    stats = sandbox.client_stats(CLIENT_ID)
    assert stats["requests"] == {"POST /oauth/token": {"403": 1}}  # the create was never sent


def test_401_renews_the_token_once(
    sandbox_factory: Factory,
    make_client: Callable[..., Any],
    redis_client: redis.Redis,
    key_prefix: str,
) -> None:
    sandbox = _start(sandbox_factory)
    client, limiter = make_client(sandbox.url)
    _create(client)
    old = redis_client.get(Keys(key_prefix).token("acme"))
    sandbox.reset()  # the sandbox forgets every token it issued
    created = _create(client, reference_id="after-reset", hold=123.0)
    assert created.reference_id == "after-reset"
    # A held slot serves the first attempt only: the renewal and the retry book their own.
    assert limiter.holds == [None, None, 123.0, None, None]
    stats = sandbox.client_stats(CLIENT_ID)
    assert stats["requests"]["POST /payments/request"] == {"200": 1}
    assert stats["token_calls"] == 1
    # The forgotten token belongs to no client any more: its 401 is counted as anonymous.
    refused = sandbox.client_stats("(anonymous)")["requests"]
    assert refused == {"POST /payments/request": {"401": 1}}
    new = redis_client.get(Keys(key_prefix).token("acme"))
    assert new
    assert new != old


def test_a_held_slot_goes_to_the_first_booking_the_token_call_when_there_is_one(
    sandbox_factory: Factory, make_client: Callable[..., Any]
) -> None:
    sandbox = _start(sandbox_factory)
    client, limiter = make_client(sandbox.url)
    _create(client, reference_id="first", hold=50.0)  # no token yet: the token call books first
    _create(client, reference_id="second", hold=60.0)  # the token is cached: the create books
    _create(client, reference_id="third")
    assert limiter.holds == [50.0, None, 60.0, None]
    assert sandbox.client_stats(CLIENT_ID)["token_calls"] == 1


def test_second_401_raises_unauthorized(
    sandbox_factory: Factory, make_client: Callable[..., Any]
) -> None:
    # Tokens live 50 ms but their answer is delayed by 150 ms: every token arrives expired.
    sandbox = _start(sandbox_factory, token_ttl=0.05, latency="token=150:150")
    client, _ = make_client(sandbox.url)
    with pytest.raises(Unauthorized) as caught:
        client.get_payment("acme", "pr_x")
    assert (caught.value.status, caught.value.endpoint) == (401, "get")
    stats = sandbox.client_stats(CLIENT_ID)
    assert stats["token_calls"] == 2
    assert stats["requests"]["GET /payments/request/{id}"] == {"401": 2}


@pytest.mark.parametrize(
    ("mode", "retry_after"),
    [("sliding", "seconds"), ("fixed", "seconds"), ("bucket", "seconds"), ("sliding", "date")],
)
def test_429_with_retry_after(
    sandbox_factory: Factory, make_client: Callable[..., Any], mode: str, retry_after: str
) -> None:
    sandbox = _start(sandbox_factory, rate=2, limit_mode=mode, retry_after=retry_after)
    client, limiter = make_client(sandbox.url)
    exc = None
    for _ in range(10):  # this limiter never waits: the sandbox must refuse one of these
        try:
            _create(client)
        except RateLimited as refused:
            exc = refused
            break
    assert exc is not None
    assert exc.status == 429
    assert exc.retry_safe
    assert exc.retry_after is not None
    if retry_after == "seconds":
        assert exc.retry_after >= 1
        assert float(exc.retry_after).is_integer()
    else:
        assert 0 <= exc.retry_after <= 2
    assert limiter.penalties == [("acme", exc.retry_after)]
    assert sandbox.client_stats(CLIENT_ID)["rate_limited"] == 1


def test_429_without_retry_after(sandbox_factory: Factory, make_client: Callable[..., Any]) -> None:
    sandbox = _start(sandbox_factory, rate=1, retry_after="none")
    client, limiter = make_client(sandbox.url)
    with pytest.raises(RateLimited) as caught:
        _create(client)  # the token call takes the only slot of this second
    assert caught.value.retry_after is None
    assert limiter.penalties == [("acme", None)]


def test_429_pauses_the_real_limiter(
    sandbox_factory: Factory,
    make_client: Callable[..., Any],
    redis_client: redis.Redis,
    key_prefix: str,
) -> None:
    """With the real RateLimiter, the penalty makes the next call wait for Retry-After."""
    sandbox = _start(sandbox_factory, rate=1)
    limiter = RateLimiter(redis=redis_client, keys=Keys(key_prefix), max_wait=3.0)
    client, _ = make_client(sandbox.url, limiter=limiter)
    with pytest.raises(RateLimited) as caught:
        _create(client)
    assert caught.value.retry_after == 1.0
    waited = limiter.acquire("acme", 7.0)
    assert waited >= 0.9


def test_5xx_server_error(sandbox_factory: Factory, make_client: Callable[..., Any]) -> None:
    sandbox = _start(
        sandbox_factory, error_rate="create=1", error_statuses="503", error_retry_after=3
    )
    client, _ = make_client(sandbox.url)
    with pytest.raises(ServerError) as caught:
        _create(client)
    exc = caught.value
    assert (exc.status, exc.retry_after, exc.retry_safe) == (503, 3.0, True)
    assert sandbox.stats()["payments_count"] == 0


def test_slot_too_far_sends_nothing(
    sandbox_factory: Factory, make_client: Callable[..., Any]
) -> None:
    sandbox = _start(sandbox_factory)
    client, _ = make_client(sandbox.url, limiter=RecordingLimiter(far=True))
    with pytest.raises(SlotTooFar) as caught:
        _create(client, max_wait=0.1)
    assert caught.value.retry_in == 2.5
    assert sandbox.client_stats(CLIENT_ID) == {}


# --- transport ----------------------------------------------------------------------------------


def test_dropped_create_is_ambiguous(
    sandbox_factory: Factory, make_client: Callable[..., Any]
) -> None:
    sandbox = _start(sandbox_factory, drop_create_rate=1.0)
    client, _ = make_client(sandbox.url)
    with pytest.raises(Ambiguous) as caught:
        _create(client, reference_id="dropped-1")
    exc = caught.value
    assert not isinstance(exc, NotSent)
    assert not exc.retry_safe
    assert exc.endpoint == "create"
    stats = sandbox.stats()
    assert stats["creates_by_reference"][CLIENT_ID] == {"dropped-1": 1}  # posted exactly once
    assert len(stats["dropped_creates"]) == 1


def test_connection_refused_is_not_sent(make_client: Callable[..., Any]) -> None:
    client, _ = make_client(f"http://127.0.0.1:{free_port()}")
    before = _token_failures("acme", "NotSent")
    with pytest.raises(NotSent) as caught:
        _create(client)
    exc = caught.value
    assert _token_failures("acme", "NotSent") == before + 1
    assert exc.retry_safe
    assert exc.endpoint == "token"
    assert "ConnectionRefusedError" in exc.message
    assert isinstance(exc.__cause__, Exception)  # the library error is kept as the cause only


def test_create_after_the_server_went_away_is_not_sent(
    sandbox_factory: Factory, make_client: Callable[..., Any]
) -> None:
    sandbox = _start(sandbox_factory)
    client, _ = make_client(sandbox.url)
    _create(client)  # token cached, a keep-alive connection pooled
    sandbox.stop()
    with pytest.raises((NotSent, Ambiguous)) as caught:
        _create(client)
    # The pooled connection may have been closed by the peer (then: Ambiguous, the safe side)
    # or found dead and replaced by a refused new one (NotSent); never a success, never requests'.
    assert caught.value.endpoint == "create"


def test_read_timeout_is_ambiguous(
    sandbox_factory: Factory, make_client: Callable[..., Any]
) -> None:
    sandbox = _start(sandbox_factory, latency="create=600:600,get=600:600")
    client, _ = make_client(sandbox.url, read_timeout=0.2)
    with pytest.raises(Ambiguous) as caught:
        _create(client)
    assert not caught.value.retry_safe
    assert "read_timeout=0.2" in caught.value.message
    with pytest.raises(Ambiguous) as on_get:
        client.get_payment("acme", "pr_x")
    assert on_get.value.retry_safe  # a GET may always be repeated
    wait_until(lambda: sandbox.stats()["payments_count"] == 1, what="the create to be made")


def test_malformed_answers(sandbox_factory: Factory, make_client: Callable[..., Any]) -> None:
    sandbox = _start(sandbox_factory, seed=7)
    client, _ = make_client(sandbox.url)
    existing = _create(client)
    sandbox.set_faults(malformed_rate={"create": 1.0, "get": 1.0})
    for _ in range(6):  # the sandbox draws html, truncated or missing-fields bodies
        with pytest.raises(MalformedCreateResponse) as caught:
            _create(client)
        assert isinstance(caught.value, Ambiguous)  # the payment was probably made
        assert caught.value.endpoint == "create"
        with pytest.raises(MalformedResponse) as on_get:
            client.get_payment("acme", existing.id)
        assert not isinstance(on_get.value, Ambiguous)
        assert on_get.value.endpoint == "get"
    assert sandbox.client_stats(CLIENT_ID)["faults"] == {"malformed": 12}
    assert sandbox.stats()["payments_count"] == 7


def test_malformed_token_answer(sandbox_factory: Factory, make_client: Callable[..., Any]) -> None:
    sandbox = _start(sandbox_factory, malformed_rate="token=1")
    client, _ = make_client(sandbox.url)
    with pytest.raises(MalformedResponse) as caught:
        _create(client)
    assert caught.value.endpoint == "token"
    assert sandbox.client_stats(CLIENT_ID)["requests"] == {"POST /oauth/token": {"200": 1}}


class ScriptedServer:
    """A real socket server: answers the token call, then treats every other request by
    ``mode``: ``close`` reads it and closes the connection without an answer (a crash, or a
    stale keep-alive connection), ``huge`` answers 200 with a body larger than MAX_BODY."""

    def __init__(self, mode: str = "close") -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _answer(conn: socket.socket, body: bytes) -> None:
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):  # the client may stop reading a huge body
            conn.sendall(head.encode() + body)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                line = data.split(b"\r\n", 1)[0].decode()
                self.requests.append(line)
                if line.startswith("POST /oauth/token"):
                    token = {"access_token": "scripted-tok-123456", "expires_in": 60}
                    self._answer(conn, json.dumps({**token, "token_type": "Bearer"}).encode())
                elif self.mode == "huge":
                    padding = "x" * (MAX_BODY + 10)
                    self._answer(conn, json.dumps({"id": "pr_1", "pad": padding}).encode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def closing_server() -> Iterator[ScriptedServer]:
    server = ScriptedServer("close")
    yield server
    server.close()


def test_server_closing_without_answer(
    closing_server: ScriptedServer, make_client: Callable[..., Any]
) -> None:
    client, limiter = make_client(closing_server.url)
    with pytest.raises(Ambiguous) as on_create:
        _create(client)
    assert not isinstance(on_create.value, NotSent)
    assert not on_create.value.retry_safe
    assert [r.split()[1] for r in closing_server.requests] == ["/oauth/token", "/payments/request"]
    closing_server.requests.clear()
    with pytest.raises(Ambiguous) as on_get:
        client.get_payment("acme", "pr_1")
    assert on_get.value.retry_safe
    # A GET is retried once on a closed connection (stale keep-alive), through the limiter.
    assert closing_server.requests == ["GET /payments/request/pr_1 HTTP/1.1"] * 2
    assert len(limiter.acquired) == 4  # token, create, get, get again


def test_huge_body_is_malformed(make_client: Callable[..., Any]) -> None:
    server = ScriptedServer("huge")
    try:
        client, _ = make_client(server.url)
        with pytest.raises(MalformedResponse) as caught:
            client.get_payment("acme", "pr_1")
    finally:
        server.close()
    assert "larger than" in caught.value.message
    assert caught.value.endpoint == "get"


def test_threads_share_the_pool_and_one_token(
    sandbox_factory: Factory,
    make_client: Callable[..., Any],
    redis_client: redis.Redis,
    key_prefix: str,
) -> None:
    sandbox = _start(sandbox_factory, latency="token=100:100")
    client, _ = make_client(sandbox.url)
    created = _create(client)
    current = redis_client.get(Keys(key_prefix).token("acme"))
    assert current is not None
    assert client.tokens.invalidate("acme", current.decode())  # as after a 401
    results: list[str] = []
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            for _ in range(5):
                results.append(client.get_payment("acme", created.id).id)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert results == [created.id] * 160
    stats = sandbox.client_stats(CLIENT_ID)
    assert stats["token_calls"] == 2  # the first, and one renewal shared by 32 threads
    assert stats["requests"]["GET /payments/request/{id}"] == {"200": 160}


def test_limiter_redis_down_is_not_sent(
    sandbox_factory: Factory, make_client: Callable[..., Any], key_prefix: str
) -> None:
    sandbox = _start(sandbox_factory)
    dead = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    client, _ = make_client(sandbox.url, limiter=RateLimiter(redis=dead, keys=Keys(key_prefix)))
    with pytest.raises(NotSent) as caught:
        _create(client)
    assert caught.value.endpoint == "token"
    assert sandbox.client_stats(CLIENT_ID) == {}


# --- no secret anywhere -------------------------------------------------------------------------


def test_no_secret_or_token_in_logs_or_errors(
    sandbox_factory: Factory,
    make_client: Callable[..., Any],
    redis_client: redis.Redis,
    key_prefix: str,
) -> None:
    """Run every kind of call and failure with all logging captured, stdlib DEBUG included."""
    stream = io.StringIO()
    configure_logging(fmt="json", level="DEBUG", stream=stream)
    texts: list[str] = []
    tokens: set[str] = set()

    def note(exc: BaseException) -> None:
        texts.extend([str(exc), repr(exc)])
        cause = exc.__cause__
        if isinstance(exc, PaypollError) and cause is not None:
            texts.append(str(cause))
        structlog.get_logger("test").exception("caught", error=exc)
        logging.getLogger("dramatiq.test").exception("stdlib caught")

    def token_now() -> None:
        raw = redis_client.get(Keys(key_prefix).token("acme"))
        if raw:
            tokens.add(raw.decode())

    try:
        sandbox = _start(sandbox_factory, latency="get=300:300")
        client, _ = make_client(sandbox.url, read_timeout=0.2)
        created = _create(client)
        token_now()
        for call in (
            lambda: client.get_payment("acme", created.id),  # read timeout
            lambda: _create(client, currency="EUR"),  # 400
        ):
            try:
                call()
            except ApiError as exc:
                note(exc)
        sandbox.reset()
        _create(client)  # 401, then renewed
        token_now()
        bad, _ = make_client(sandbox.url, secret="another-wrong-secret-xyz")
        redis_client.delete(Keys(key_prefix).token("acme"))
        try:
            _create(bad)
        except CredentialsRefused as exc:
            note(exc)
        gone, _ = make_client(f"http://127.0.0.1:{free_port()}")
        try:
            _create(gone)
        except NotSent as exc:
            note(exc)
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if type(handler).__name__ == "_PaypollHandler":
                root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        structlog.reset_defaults()

    output = stream.getvalue()
    assert len(tokens) == 2
    lines = [json.loads(line) for line in output.splitlines()]
    assert sum(1 for line in lines if line.get("event") == "api.request") >= 8
    assert any(line.get("logger", "").startswith("urllib3") for line in lines)
    everything = output + "\n".join(texts)
    basic = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    for secret in (SECRET, "another-wrong-secret-xyz", basic, *tokens):
        assert secret not in everything


def test_the_before_send_lead_follows_the_longest_recent_mark_within_its_cap() -> None:
    """The lead grows at once to a slow mark, decays after it, and never passes its cap."""
    from worker.api.client import BeforeSendLead

    lead = BeforeSendLead(cap=0.010, decay=0.5)
    lead.observe(0.004)
    assert lead.seconds == 0.004
    lead.observe(0.001)
    assert lead.seconds == 0.002  # the slow one decays
    lead.observe(0.5)
    assert lead.seconds == 0.010  # capped: a mark is never older than that at the send
