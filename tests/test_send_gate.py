"""The slot is waited for after the connection is made: a slow connect never makes a call late.

Real parts: the sandbox in strict sliding mode over a socket, the real limiter on a real Redis,
the real ApiClient and urllib3 pools. The one stand-in is the network's latency: connections
here are made over loopback in microseconds, so the connection classes below sleep 80 ms in
``connect`` (what a TLS handshake to the real API costs), the only way to get a slow connect.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from tests.sandbox_fixture import RunningSandbox, sandbox_factory
from worker import metrics
from worker.api import ApiClient
from worker.api.send_gate import (
    GatedAdapter,
    GatedHTTPConnection,
    GatedHTTPConnectionPool,
    GateRefused,
    plan_send,
    send_gate,
)
from worker.api.transport import new_session, prepare
from worker.errors import ApiError, NotFound, SlotMissed, SlotTooFar
from worker.keys import Keys
from worker.ratelimit import RateLimiter
from worker.settings import Account, Secret, Settings

__all__ = ["sandbox_factory"]

CLIENT_ID = "client-gate"
SECRET = "gate-secret-8d1f"
CONNECT_DELAY = 0.080


class SlowConnect(HTTPConnection):
    """A connection whose connect takes CONNECT_DELAY (the stand-in for a TLS handshake)."""

    def connect(self) -> None:
        time.sleep(CONNECT_DELAY)
        super().connect()


class SlowGatedConnection(GatedHTTPConnection, SlowConnect):
    pass


class SlowGatedPool(GatedHTTPConnectionPool):
    ConnectionCls = SlowGatedConnection


class SlowPool(HTTPConnectionPool):
    ConnectionCls = SlowConnect


def slow_session(*, gated: bool) -> requests.Session:
    """The product's session (gated) or one with a plain adapter, both with slow connects."""
    session = new_session()
    if not gated:
        session.mount("http://", HTTPAdapter(max_retries=0))
    adapter = session.get_adapter("http://x")
    assert isinstance(adapter, HTTPAdapter)
    adapter.poolmanager.pool_classes_by_scheme = {"http": SlowGatedPool if gated else SlowPool}
    return session


@pytest.fixture
def strict_sandbox(sandbox_factory: Callable[..., RunningSandbox]) -> RunningSandbox:
    return sandbox_factory(client=[f"{CLIENT_ID}:{SECRET}"], rate=5, limit_mode="sliding")


def run_calls(
    sandbox: RunningSandbox,
    redis_client: redis.Redis,
    key_prefix: str,
    *,
    gated: bool,
    account: str,
) -> tuple[int, float]:
    """Make 13 GETs one after the other, dropping the pooled connection before every sixth
    (so that call connects, slowly, and the five after it reuse the connection); return the
    sandbox's 429 count and how many slots the limiter found too late."""
    settings = Settings(api_url=sandbox.url, key_prefix=key_prefix).with_accounts(
        Account(account, CLIENT_ID, Secret(SECRET), rate=5.0)
    )
    limiter = RateLimiter(redis=redis_client, keys=Keys(key_prefix), max_wait=2.0)
    session = slow_session(gated=gated)
    client = ApiClient(settings=settings, redis=redis_client, limiter=limiter, session=session)
    late_before = metrics.LIMITER_LATE.labels(account)._value.get()
    client.tokens.get(settings.account(account))  # the token first: its own slow connect
    for call in range(13):
        if call % 6 == 0:
            session.get_adapter(sandbox.url).close()  # the next call makes a new connection
        with pytest.raises(ApiError) as caught:
            client.get_payment(account, "no-such-payment")
        assert isinstance(caught.value, NotFound) or caught.value.status == 429
    session.close()
    refused = sandbox.stats(payments=False)["clients"][CLIENT_ID]["rate_limited"]
    return refused, metrics.LIMITER_LATE.labels(account)._value.get() - late_before


def test_a_new_connection_is_made_before_the_slot_not_after_it(
    strict_sandbox: RunningSandbox, redis_client: redis.Redis, key_prefix: str
) -> None:
    refused, late = run_calls(strict_sandbox, redis_client, key_prefix, gated=True, account="gated")
    assert refused == 0
    # The gate saw each slow connect eat into an idle key's "now" slot and took a fresh one.
    assert late >= 1


def test_without_the_gate_the_same_calls_are_refused(
    strict_sandbox: RunningSandbox, redis_client: redis.Redis, key_prefix: str
) -> None:
    # The control: what the gate prevents happens here. A call that connects after its slot
    # reaches the API 80 ms late; the call five slots later is on time, and both fall in one
    # second with the four between them.
    refused, _ = run_calls(strict_sandbox, redis_client, key_prefix, gated=False, account="ungated")
    assert refused >= 1


def test_gate_runs_once_connected_and_its_refusal_sends_nothing(
    strict_sandbox: RunningSandbox,
) -> None:
    made: list[GatedHTTPConnection] = []

    class Recording(GatedHTTPConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    class RecordingPool(GatedHTTPConnectionPool):
        ConnectionCls = Recording

    session = new_session()
    adapter = session.get_adapter(strict_sandbox.url)
    assert isinstance(adapter, GatedAdapter)
    adapter.poolmanager.pool_classes_by_scheme = {"http": RecordingPool}
    url = f"{strict_sandbox.url}/payments/request/x"
    prepared = session.prepare_request(requests.Request("GET", url))
    assert plan_send(session, prepared)[0]
    connected: list[bool] = []

    def refuse() -> None:
        connected.append(len(made) == 1 and made[0].sock is not None)
        raise SlotTooFar("acme", 1.5)

    with pytest.raises(GateRefused) as caught, send_gate(refuse) as pending:
        session.send(prepared, timeout=5)
    assert pending.ran and connected == [True]  # the gate ran on a made connection
    assert isinstance(caught.value.reason, SlotTooFar)
    stats = strict_sandbox.stats(payments=False)
    assert stats["clients"].get(CLIENT_ID, {}).get("total", 0) == 0  # nothing reached it
    session.close()


def test_no_gate_through_a_proxy_or_a_foreign_adapter() -> None:
    session = new_session()
    prepared = session.prepare_request(requests.Request("GET", "http://api.test/x"))
    assert plan_send(session, prepared)[0]
    session.proxies = {"http": "http://proxy.test:3128"}
    assert not plan_send(session, prepared)[0]  # a proxied request uses the proxy's pools
    plain = requests.Session()
    assert not plan_send(plain, plain.prepare_request(requests.Request("GET", "http://a/")))[0]
    assert isinstance(new_session().get_adapter("https://api.test/"), GatedAdapter)


def test_a_create_whose_mark_made_it_late_is_not_sent(
    strict_sandbox: RunningSandbox, redis_client: redis.Redis, key_prefix: str
) -> None:
    # before_send is the create step's Redis write marking the payment as sent; on a Redis
    # with appendfsync always it can take tens of milliseconds, after the slot's lateness
    # check. Here it sleeps 40 ms (the stand-in for a slow fsync) on an idle key whose slot
    # was "now": too late to send, so nothing is, and the error says a retry is safe.
    settings = Settings(api_url=strict_sandbox.url, key_prefix=key_prefix).with_accounts(
        Account("marked", CLIENT_ID, Secret(SECRET), rate=5.0)
    )
    limiter = RateLimiter(redis=redis_client, keys=Keys(key_prefix), max_wait=2.0)
    client = ApiClient(settings=settings, redis=redis_client, limiter=limiter)
    client.tokens.get(settings.account("marked"))
    time.sleep(0.3)  # let the key go idle: the create's slot is "now"
    marks: list[float] = []

    def slow_mark() -> None:
        marks.append(time.monotonic())
        time.sleep(0.040)

    with pytest.raises(SlotMissed) as caught:
        client.create_payment(
            "marked",
            amount="10",
            currency="USD",
            redirect_url="https://x.test/",
            before_send=slow_mark,
        )
    assert caught.value.retry_safe
    assert len(marks) == 1
    routes = strict_sandbox.stats(payments=False)["clients"][CLIENT_ID]["requests"]
    assert set(routes) == {"POST /oauth/token"}  # the create never reached the API
    # A prompt mark goes through.
    made = client.create_payment(
        "marked",
        amount="10",
        currency="USD",
        redirect_url="https://x.test/",
        before_send=lambda: None,
    )
    assert made.id


class SlowHeaders(GatedHTTPConnection):
    """Building the request after the gate takes 40 ms: the stand-in for a thread descheduled
    between the gate's check and the write (a CPU-starved host; not reproducible on demand)."""

    slow = True

    def putheader(self, header: str | bytes, *values: Any) -> None:
        if SlowHeaders.slow and str(header).lower() == "accept":
            time.sleep(0.040)
        super().putheader(header, *values)


class SlowHeadersPool(GatedHTTPConnectionPool):
    ConnectionCls = SlowHeaders


def test_a_call_made_late_after_its_gate_is_stopped_at_the_write(
    strict_sandbox: RunningSandbox, redis_client: redis.Redis, key_prefix: str
) -> None:
    # The gate's check passes (the slot is "now" on an idle key), then the headers take 40 ms:
    # more than the slack a late call may use. The last check, run at the first write, finds
    # the call late and sends nothing; a call whose headers are prompt goes through.
    settings = Settings(api_url=strict_sandbox.url, key_prefix=key_prefix).with_accounts(
        Account("slowhdr", CLIENT_ID, Secret(SECRET), rate=5.0)
    )
    limiter = RateLimiter(redis=redis_client, keys=Keys(key_prefix), max_wait=2.0)
    session = new_session()
    adapter = session.get_adapter(strict_sandbox.url)
    assert isinstance(adapter, GatedAdapter)
    adapter.poolmanager.pool_classes_by_scheme = {"http": SlowHeadersPool}
    client = ApiClient(settings=settings, redis=redis_client, limiter=limiter, session=session)
    SlowHeaders.slow = False
    client.tokens.get(settings.account("slowhdr"))
    SlowHeaders.slow = True
    time.sleep(0.3)  # let the key go idle: the next slot is "now"
    late_before = metrics.LIMITER_LATE.labels("slowhdr")._value.get()
    with pytest.raises(SlotMissed) as caught:
        client.get_payment("slowhdr", "no-such-payment")
    assert caught.value.retry_safe
    assert metrics.LIMITER_LATE.labels("slowhdr")._value.get() == late_before + 1
    routes = strict_sandbox.stats(payments=False)["clients"][CLIENT_ID]["requests"]
    assert set(routes) == {"POST /oauth/token"}  # the GET never reached the API
    SlowHeaders.slow = False
    with pytest.raises(NotFound):
        client.get_payment("slowhdr", "no-such-payment")
    routes = strict_sandbox.stats(payments=False)["clients"][CLIENT_ID]["requests"]
    assert routes["GET /payments/request/{id}"] == {"404": 1}  # sent once, when on time
    session.close()


def test_environment_proxies_are_read_once_per_host_as_requests_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # issue 14: requests walked os.environ on every send; the ApiSession does it once per host
    # and finds what requests' own resolve_proxies finds.
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "direct.test")
    session = new_session()
    assert session.trust_env is False  # no per-request environment walk, no ~/.netrc
    for url in ("http://api.test/x", "http://direct.test/x", "https://api.test/x"):
        prepared = session.prepare_request(requests.Request("GET", url))
        expected = requests.utils.resolve_proxies(prepared, {}, True)
        assert plan_send(session, prepared)[1] == expected
    proxied = session.prepare_request(requests.Request("GET", "http://api.test/y"))
    assert not plan_send(session, proxied)[0]
    direct = session.prepare_request(requests.Request("GET", "http://direct.test/y"))
    assert plan_send(session, direct)[0]
    monkeypatch.delenv("HTTP_PROXY")
    assert not plan_send(session, proxied)[0]  # read once: the session keeps what it found
    assert plan_send(new_session(), proxied)[0]


@pytest.mark.parametrize(
    ("method", "url", "json_body", "form_body"),
    [
        ("GET", "http://api.test/payments/request/pr_01ABC-x.y~z", None, None),
        ("GET", "http://API.Test:8080/payments/request/pr_1", None, None),  # normalised: slow
        ("GET", "http://api.test/payments/request/..", None, None),  # dots resolved: slow
        ("GET", "http://api.test/payments/request/a%2Fb", None, None),
        ("GET", "http://user:pw@api.test/payments/request/pr_1", None, None),  # auth in URL
        ("POST", "http://api.test/payments/request", {"amount": "10"}, None),
        ("POST", "http://api.test/oauth/token", None, "grant_type=client_credentials"),
    ],
)
def test_prepare_gives_what_requests_prepares(
    method: str, url: str, json_body: dict[str, str] | None, form_body: str | None
) -> None:
    # issue 14: the client's own preparation of a request skips requests' settings merge;
    # the PreparedRequest must be the same, header order included.
    session = new_session()
    headers = {"Authorization": "Bearer tok-123456", "Accept": "application/json"}
    ours = prepare(session, method, url, headers=headers, json_body=json_body, form_body=form_body)
    theirs = session.prepare_request(
        requests.Request(method, url, headers=dict(headers), json=json_body, data=form_body)
    )
    assert (ours.method, ours.url, ours.body, ours.hooks) == (
        theirs.method,
        theirs.url,
        theirs.body,
        theirs.hooks,
    )
    assert list(ours.headers.items()) == list(theirs.headers.items())
    assert len(ours._cookies) == len(theirs._cookies) == 0  # type: ignore[attr-defined]
