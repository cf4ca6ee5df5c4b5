"""The sandbox, over a real socket, as a real process (requests only, not paypoll's client)."""

from __future__ import annotations

import base64
import email.utils
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.sandbox_fixture import RunningSandbox, running_sandbox, sandbox_factory, sandbox_fixture
from tests.waiting import wait_until

__all__ = ["sandbox_factory"]  # re-exported fixture, used below

Factory = Callable[..., RunningSandbox]
BODY = {"amount": "100", "currency": "USD", "redirect_url": "https://shop.example/thanks"}
TERMINAL = {"paid", "expired", "cancelled"}

# A roomy sandbox for tests that are not about the rate limit.
fast = sandbox_fixture(rate=10_000, client=["alice:alice-secret", "bob:bob-secret"], seed=1)


def token_response(
    sb: RunningSandbox, client_id: str, secret: str | None = None, **kw: Any
) -> requests.Response:
    secret = sb.clients[client_id] if secret is None else secret
    data = kw.pop("data", {"grant_type": "client_credentials"})
    return requests.post(
        f"{sb.url}/oauth/token", auth=(client_id, secret), data=data, timeout=5, **kw
    )


def bearer(sb: RunningSandbox, client_id: str) -> dict[str, str]:
    response = token_response(sb, client_id)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def create(
    sb: RunningSandbox, headers: dict[str, str], path: str = "/payments/request", **body: Any
) -> requests.Response:
    return requests.post(f"{sb.url}{path}", json={**BODY, **body}, headers=headers, timeout=5)


def get(
    sb: RunningSandbox, headers: dict[str, str], pid: str, path: str = "/payments/request"
) -> requests.Response:
    return requests.get(f"{sb.url}{path}/{pid}", headers=headers, timeout=5)


def assert_error_shapes(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert body["message"]
    assert body["error"]["message"] == body["message"]
    assert isinstance(body["validation_errors"], dict)
    return body


# ---------------------------------------------------------------- tokens
def test_token_ok_alternates_token_type(fast: RunningSandbox) -> None:
    first, second = token_response(fast, "alice"), token_response(fast, "alice")
    assert first.status_code == second.status_code == 200
    for response in (first, second):
        data = response.json()
        assert set(data) == {"access_token", "expires_in", "token_type"}
        assert data["expires_in"] == 3600
    assert {first.json()["token_type"], second.json()["token_type"]} == {"bearer", "Bearer"}
    assert first.json()["access_token"] != second.json()["access_token"]
    assert fast.client_stats("alice")["token_calls"] == 2


def test_token_refusals(fast: RunningSandbox) -> None:
    assert_error_shapes(token_response(fast, "alice", "wrong"), 403, "invalid_client")
    assert_error_shapes(token_response(fast, "mallory", "x"), 403, "invalid_client")
    body = assert_error_shapes(
        token_response(fast, "alice", data={"grant_type": "password"}),
        400,
        "unsupported_grant_type",
    )
    assert "grant_type" in body["validation_errors"]
    no_auth = requests.post(
        f"{fast.url}/oauth/token", data={"grant_type": "client_credentials"}, timeout=5
    )
    assert_error_shapes(no_auth, 401, "unauthorized")
    stats = fast.stats(payments=False)["clients"]
    # The token call is counted under its Basic client_id even with a wrong secret.
    assert stats["alice"]["requests"]["POST /oauth/token"] == {"403": 1, "400": 1}
    assert stats["mallory"]["requests"]["POST /oauth/token"] == {"403": 1}


def test_missing_unknown_and_expired_bearer_get_401(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=1000, token_ttl=0.5)
    assert token_response(sb, "sandbox-client").json()["expires_in"] == 0.5
    headers = bearer(sb, "sandbox-client")
    assert create(sb, headers).status_code == 200
    assert_error_shapes(create(sb, {}), 401, "unauthorized")
    assert_error_shapes(create(sb, {"Authorization": "Bearer nope"}), 401, "unauthorized")
    wait_until(
        lambda: create(sb, headers).status_code == 401, timeout=5, what="the token to expire"
    )
    assert_error_shapes(create(sb, headers), 401, "token_expired")


# ---------------------------------------------------------------- payments
@pytest.mark.parametrize(
    ("create_path", "get_path"),
    [("/payments/request", "/payment/request"), ("/payment/request", "/payments/request")],
)
def test_create_and_get_on_both_paths(
    fast: RunningSandbox, create_path: str, get_path: str
) -> None:
    headers = bearer(fast, "alice")
    created = create(fast, headers, create_path, reference_id="order-1234 ü")
    assert created.status_code == 200, created.text
    payment = created.json()
    assert payment["reference_id"] == "order-1234 ü"
    assert payment["status"] == "pending"
    assert payment["redirect_url"] == BODY["redirect_url"]
    assert payment["url"].startswith("http")
    fetched = get(fast, headers, payment["id"], get_path)
    assert fetched.status_code == 200
    assert fetched.json()["id"] == payment["id"]
    assert fetched.json()["reference_id"] == "order-1234 ü"
    stats = fast.stats()
    assert stats["payments"][payment["id"]]["polls"] == 1
    assert stats["clients"]["alice"]["requests"][f"GET {get_path}/{{id}}"] == {"200": 1}


def test_no_deduplication_by_reference_id(fast: RunningSandbox) -> None:
    headers = bearer(fast, "alice")
    ids = {create(fast, headers, reference_id="same").json()["id"] for _ in range(3)}
    assert len(ids) == 3
    create(fast, headers, reference_id="once")
    create(fast, headers)  # no reference_id: not in creates_by_reference
    stats = fast.stats()
    assert stats["creates_by_reference"]["alice"] == {"same": 3, "once": 1}
    assert stats["duplicates"] == [{"client_id": "alice", "reference_id": "same", "count": 3}]
    assert stats["payments_count"] == 5


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"currency": "USD", "redirect_url": "https://a.b/c"}, 400, "validation_error", "amount"),
        ({**BODY, "amount": "-5"}, 400, "validation_error", "amount"),
        ({**BODY, "amount": "0"}, 400, "validation_error", "amount"),
        ({**BODY, "amount": "ten"}, 400, "validation_error", "amount"),
        ({**BODY, "amount": 100}, 400, "validation_error", "amount"),
        ({**BODY, "currency": "EUR"}, 400, "validation_error", "currency"),
        ({**BODY, "redirect_url": "/thanks"}, 400, "validation_error", "redirect_url"),
        ({**BODY, "reference_id": 12}, 400, "validation_error", "reference_id"),
        ([BODY], 400, "invalid_body", None),
        ({**BODY, "amount": "1000000.01"}, 422, "amount_too_large", "amount"),
    ],
)
def test_create_validation_errors_have_both_shapes(
    fast: RunningSandbox, body: Any, status: int, code: str, field: str | None
) -> None:
    headers = bearer(fast, "alice")
    response = requests.post(f"{fast.url}/payments/request", json=body, headers=headers, timeout=5)
    error = assert_error_shapes(response, status, code)
    if field:
        assert field in error["validation_errors"]
    assert fast.stats()["payments_count"] == 0


def test_create_not_json_is_400(fast: RunningSandbox) -> None:
    headers = {**bearer(fast, "alice"), "Content-Type": "application/json"}
    response = requests.post(
        f"{fast.url}/payments/request", data=b"{not json", headers=headers, timeout=5
    )
    assert_error_shapes(response, 400, "invalid_json")


def test_unknown_and_other_clients_payment_are_404(fast: RunningSandbox) -> None:
    alice, bob = bearer(fast, "alice"), bearer(fast, "bob")
    pid = create(fast, alice).json()["id"]
    assert_error_shapes(get(fast, bob, pid), 404, "not_found")
    assert_error_shapes(get(fast, alice, "pr_doesnotexist"), 404, "not_found")
    assert get(fast, alice, pid).status_code == 200
    assert fast.stats()["payments"][pid]["polls"] == 1  # bob's attempt is not a poll


# ---------------------------------------------------------------- rate limit
def burst(sb: RunningSandbox, headers: dict[str, str], pid: str, n: int) -> list[requests.Response]:
    with requests.Session() as session:
        return [
            session.get(f"{sb.url}/payments/request/{pid}", headers=headers, timeout=5)
            for _ in range(n)
        ]


@pytest.mark.parametrize("mode", ["sliding", "fixed", "bucket"])
def test_429_in_each_limit_mode(sandbox_factory: Factory, mode: str) -> None:
    sb = sandbox_factory(rate=5, limit_mode=mode)
    token = token_response(sb, "sandbox-client")  # counts: 1 of the 5
    headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
    started = time.monotonic()
    answers = burst(sb, headers, "pr_x", 12)
    elapsed = time.monotonic() - started
    refused = [r for r in answers if r.status_code == 429]
    accepted = [r for r in answers if r.status_code != 429]
    assert refused, "a burst of 13 requests at rate 5 must be refused in part"
    for response in refused:
        assert_error_shapes(response, 429, "rate_limited")
        assert int(response.headers["Retry-After"]) >= 1
    if elapsed < 0.8:  # (a very slow machine would spread the burst over two windows)
        # token call + accepted GETs <= 5, or 10 for fixed windows straddling a second
        assert 1 + len(accepted) <= (10 if mode == "fixed" else 5)
    stats = sb.client_stats("sandbox-client")
    assert stats["rate_limited"] == len(refused)
    assert stats["total"] == 13
    if mode != "fixed":
        assert stats["max_accepted_in_1s"] <= 5
    # After the advertised Retry-After, requests are accepted again.
    time.sleep(int(refused[-1].headers["Retry-After"]))
    assert get(sb, headers, "pr_x").status_code == 404


def test_token_call_with_wrong_secret_counts_for_its_client_id(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=2)
    assert token_response(sb, "sandbox-client", "wrong").status_code == 403
    assert token_response(sb, "sandbox-client", "wrong").status_code == 403
    assert token_response(sb, "sandbox-client").status_code == 429


def test_bucket_refills_at_rate(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=5, limit_mode="bucket")
    headers = bearer(sb, "sandbox-client")
    answers = burst(sb, headers, "pr_x", 8)
    assert [r.status_code for r in answers].count(429) >= 3
    # One token comes back after 1/rate = 0.2 s (a refused request does not consume any).
    time.sleep(0.25)
    assert get(sb, headers, "pr_x").status_code == 404
    assert get(sb, headers, "pr_x").status_code == 429


def test_sliding_window_max_never_above_rate_under_load(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=5, limit_mode="sliding", client=["k:s"])
    headers = bearer(sb, "k")
    stop = time.monotonic() + 1.6
    codes: list[int] = []

    def hammer() -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                response = session.get(f"{sb.url}/payments/request/x", headers=headers, timeout=5)
                codes.append(response.status_code)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = sb.stats(payments=False, times=True)["clients"]["k"]
    assert stats["max_accepted_in_1s"] == 5
    assert stats["max_requests_in_1s"] > 5
    assert stats["rate_limited"] == codes.count(429) > 0
    # Recount independently from the timestamps: no window (t-1, t] holds more than 5.
    times = sorted(stats["accepted_times"])
    assert len(times) == codes.count(404) + 1  # + the token call
    for i, t in enumerate(times):
        assert sum(1 for u in times[: i + 1] if u > t - 1.0) <= 5


@pytest.mark.parametrize("fmt", ["date", "none"])
def test_retry_after_formats(sandbox_factory: Factory, fmt: str) -> None:
    sb = sandbox_factory(rate=1, retry_after=fmt)
    token_response(sb, "sandbox-client")
    refused = token_response(sb, "sandbox-client")
    assert refused.status_code == 429
    if fmt == "none":
        assert "Retry-After" not in refused.headers
    else:
        when = email.utils.parsedate_to_datetime(refused.headers["Retry-After"]).timestamp()
        assert time.time() - 1 <= when <= time.time() + 2


# ---------------------------------------------------------------- lifecycle
def poll_until_terminal(sb: RunningSandbox, headers: dict[str, str], pid: str) -> list[str]:
    seen: list[str] = []

    def terminal() -> bool:
        seen.append(get(sb, headers, pid).json()["status"])
        return seen[-1] in TERMINAL

    wait_until(terminal, timeout=10, interval=0.05, what=f"{pid} to be terminal")
    return seen


def outcomes_of(sb: RunningSandbox, n: int) -> list[tuple[str, str]]:
    headers = bearer(sb, "sandbox-client")
    ids = [create(sb, headers, reference_id=f"r{i}").json()["id"] for i in range(n)]
    payments = sb.stats()["payments"]
    return [(pid, payments[pid]["outcome"]) for pid in ids]


def test_lifecycle_is_seeded_and_reaches_the_drawn_outcome(sandbox_factory: Factory) -> None:
    options = {"rate": 1000, "pay_after": "0.2:0.5", "seed": 7}
    first = outcomes_of(sandbox_factory(**options), 20)
    again = outcomes_of(sandbox_factory(**options), 20)
    other = outcomes_of(sandbox_factory(**{**options, "seed": 8}), 20)
    assert first == again
    assert [o for _, o in first] != [o for _, o in other]
    assert {o for _, o in first} <= TERMINAL

    sb = sandbox_factory(**options)
    headers = bearer(sb, "sandbox-client")
    ids = [create(sb, headers).json()["id"] for _ in range(4)]
    for pid in ids:
        seen = poll_until_terminal(sb, headers, pid)
        record = sb.stats()["payments"][pid]
        assert seen[-1] == record["outcome"] == record["status"]
        assert set(seen[:-1]) <= {"pending"}
        assert record["polls"] == len(seen)
        assert record["terminal_at"] is not None
        assert record["first_seen_terminal_at"] >= record["terminal_at"]
        assert 0.2 <= record["terminal_at"] - record["created_at"] <= 0.5 + 1e-6


def test_unknown_status_shows_before_outcome(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=1000, pay_after="0.6:0.6", unknown_status=1)
    headers = bearer(sb, "sandbox-client")
    pid = create(sb, headers).json()["id"]
    seen = poll_until_terminal(sb, headers, pid)
    assert "processing" in seen
    assert seen.index("processing") > 0  # pending first
    assert seen[-1] in TERMINAL


def test_stay_pending_then_expired(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=1000, stay_pending=1, expire_after=0.4, pay_after="0:0")
    headers = bearer(sb, "sandbox-client")
    pid = create(sb, headers).json()["id"]
    assert get(sb, headers, pid).json()["status"] == "pending"
    assert poll_until_terminal(sb, headers, pid)[-1] == "expired"


# ---------------------------------------------------------------- faults
def test_injected_5xx_is_not_processed(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(
        rate=1000, error_rate="create=1", error_statuses="503", error_retry_after=2
    )
    headers = bearer(sb, "sandbox-client")  # token endpoint has no fault
    response = create(sb, headers, reference_id="r")
    assert_error_shapes(response, 503, "service_unavailable")
    assert response.headers["Retry-After"] == "2"
    stats = sb.stats()
    assert stats["payments_count"] == 0
    assert stats["clients"]["sandbox-client"]["faults"] == {"error": 1}


def test_dropped_create_exists_but_client_gets_no_answer(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=1000, drop_create_rate=1)
    headers = bearer(sb, "sandbox-client")
    with pytest.raises(requests.ConnectionError):
        create(sb, headers, reference_id="lost-1")
    stats = sb.stats()
    [dropped] = stats["dropped_creates"]
    assert dropped["client_id"] == "sandbox-client"
    assert dropped["reference_id"] == "lost-1"
    assert stats["payments"][dropped["payment_id"]]["reference_id"] == "lost-1"
    assert stats["creates_by_reference"]["sandbox-client"] == {"lost-1": 1}
    assert stats["clients"]["sandbox-client"]["requests"]["POST /payments/request"] == {
        "dropped": 1
    }
    # The payment can be fetched: it really exists.
    assert get(sb, headers, dropped["payment_id"]).status_code == 200
    # On a reused keep-alive connection too, the client sees a connection error.
    with requests.Session() as session:
        assert (
            session.get(f"{sb.url}/payments/request/x", headers=headers, timeout=5).status_code
            == 404
        )
        with pytest.raises(requests.ConnectionError):
            session.post(f"{sb.url}/payments/request", json=BODY, headers=headers, timeout=5)
    assert len(sb.stats()["dropped_creates"]) == 2


def test_fault_draws_are_seeded(sandbox_factory: Factory) -> None:
    def statuses(seed: int) -> list[int]:
        sb = sandbox_factory(rate=1000, error_rate="get=0.5", seed=seed)
        headers = bearer(sb, "sandbox-client")
        return [get(sb, headers, "nope").status_code for _ in range(24)]

    first = statuses(11)
    assert first == statuses(11)
    assert {404} < set(first)  # some faults, some processed
    assert first != statuses(12)


def test_malformed_answers_are_processed(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=1000, malformed_rate="get=1", seed=3)
    headers = bearer(sb, "sandbox-client")
    pid = create(sb, headers).json()["id"]
    for _ in range(6):
        response = get(sb, headers, pid)
        assert response.status_code == 200
        try:
            data = response.json()
        except json.JSONDecodeError:
            continue
        assert "id" not in data or "status" not in data
    stats = sb.stats()
    assert stats["payments"][pid]["polls"] == 6
    assert stats["clients"]["sandbox-client"]["faults"] == {"malformed": 6}


def test_latency_is_added(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(rate=1000, latency="get=150:150")
    headers = bearer(sb, "sandbox-client")
    started = time.monotonic()
    assert get(sb, headers, "nope").status_code == 404
    assert time.monotonic() - started >= 0.15


# ---------------------------------------------------------------- admin
def test_faults_change_at_run_time(fast: RunningSandbox) -> None:
    headers = bearer(fast, "alice")
    pid = create(fast, headers).json()["id"]
    settings = fast.set_faults(error_rate={"get": 1}, error_statuses=[502])
    assert settings["error_rate"] == {"token": 0.0, "create": 0.0, "get": 1.0}
    assert get(fast, headers, pid).status_code == 502
    fast.set_faults(error_rate=0)
    assert get(fast, headers, pid).status_code == 200
    bad = requests.post(f"{fast.url}/_admin/faults", json={"nope": 1}, timeout=5)
    assert_error_shapes(bad, 400, "invalid_admin_request")
    bad = requests.post(f"{fast.url}/_admin/faults", json={"error_rate": 2}, timeout=5)
    assert bad.status_code == 400


def test_reset_forgets_everything(fast: RunningSandbox) -> None:
    headers = bearer(fast, "alice")
    pid = create(fast, headers, reference_id="a").json()["id"]
    fast.set_faults(malformed_rate=1)
    fast.reset()
    stats = fast.stats()
    assert stats["clients"] == {}
    assert stats["payments"] == {}
    assert stats["creates_by_reference"] == {}
    assert stats["faults"]["malformed_rate"]["get"] == 0.0  # start faults restored
    assert_error_shapes(get(fast, headers, pid), 401, "unauthorized")  # tokens forgotten
    headers = bearer(fast, "alice")
    new_pid = create(fast, headers).json()["id"]
    assert new_pid != pid


def test_force_status(fast: RunningSandbox) -> None:
    headers = bearer(fast, "alice")
    pid = create(fast, headers).json()["id"]
    assert fast.force_status(pid, "cancelled")["status"] == "cancelled"
    assert get(fast, headers, pid).json()["status"] == "cancelled"
    assert fast.stats()["payments"][pid]["first_seen_terminal_at"] is not None


# ---------------------------------------------------------------- process and CLI
def test_paypoll_cli_starts_it_and_keeps_secrets_out_of_output() -> None:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "worker.cli", "sandbox", "--port", "0", "--log-requests"),
            *("--client", "acme:topsecret-123", "--exit-with-parent"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("sandbox listening on http://127.0.0.1:")
        url = line.split()[-1]
        response = requests.post(
            f"{url}/oauth/token",
            auth=("acme", "topsecret-123"),
            data={"grant_type": "client_credentials"},
            timeout=5,
        )
        assert response.status_code == 200
    finally:
        process.terminate()
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert b"topsecret-123" not in out + err
    assert response.json()["access_token"].encode() not in out + err
    assert b"POST /oauth/token" in err  # --log-requests logs to stderr


def test_bad_client_option_does_not_echo_secret() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.sandbox", "--port", "0", "--client", "onlyasecret"],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert b"onlyasecret" not in result.stdout + result.stderr


def test_running_sandbox_stops_its_process() -> None:
    with running_sandbox(seed=5) as sb:
        assert requests.get(f"{sb.url}/_admin/health", timeout=5).json() == {"ok": True}
        process = sb.process
    assert process.poll() is not None


# ---------------------------------------------------------------- pure parts, exact clocks
def test_sliding_window_algorithm_exact_boundaries() -> None:
    from worker.sandbox.ratelimit import SlidingWindow, retry_after_seconds

    limiter = SlidingWindow(2)
    assert limiter.try_acquire(100.0) is None
    assert limiter.try_acquire(100.5) is None
    assert limiter.try_acquire(100.9) == pytest.approx(0.1)  # refused: not counted
    assert limiter.try_acquire(101.0) is None  # 100.0 left the window (100.0, 101.0]
    assert limiter.try_acquire(101.2) == pytest.approx(0.3)
    assert retry_after_seconds(0.3) == 1
    assert retry_after_seconds(1.2) == 2


def test_sliding_window_judges_out_of_order_arrivals_at_their_own_time() -> None:
    from worker.sandbox.ratelimit import SlidingWindow

    limiter = SlidingWindow(2)
    assert limiter.try_acquire(11.05) is None
    assert limiter.try_acquire(10.0) is None  # judged after 11.05, arrived before it
    # Every window holding 11.02 holds at most one other accepted arrival (11.05): 10.0 is
    # more than 1 s before it. Judging in order of handling would have refused it.
    assert limiter.try_acquire(11.02) is None
    # (10.5, 11.5] would hold 10.5, 11.02 and 11.05: refused. It would be the first of that
    # full group, so the hint is a whole second.
    assert limiter.try_acquire(10.5) == pytest.approx(1.0)
    # 11.04 would make (11.02, 11.05) three: room when 11.02 leaves, 0.98 s later.
    assert limiter.try_acquire(11.04) == pytest.approx(0.98)
    assert limiter.try_acquire(12.03) is None  # 11.02 has left (11.03, 12.03]


def test_sandbox_does_not_move_an_early_arrival_behind_a_later_one() -> None:
    from worker.sandbox.config import SandboxConfig
    from worker.sandbox.state import Sandbox

    sandbox = Sandbox(SandboxConfig(clients={"a": "sa", "b": "sb"}, rate=1), base_url="x")

    def token(client: str, secret: str, arrived: float) -> int:
        basic = base64.b64encode(f"{client}:{secret}".encode()).decode()
        answer = sandbox.request(
            "token",
            "POST /oauth/token",
            authorization=f"Basic {basic}",
            content_type="application/x-www-form-urlencoded",
            body=b"grant_type=client_credentials",
            arrived=arrived,
        )
        return answer.status

    assert token("a", "sa", 100.5) == 200
    assert token("b", "sb", 100.0) == 200  # handled second, arrived first: judged at 100.0
    assert token("b", "sb", 100.99) == 429  # (99.99, 100.99] holds b's 100.0
    assert token("b", "sb", 101.01) == 200
    times = sandbox.stats(payments=False, times=True)["clients"]["b"]["accepted_times"]
    assert times == [100.0, 101.01]


def test_fixed_and_bucket_algorithms() -> None:
    from worker.sandbox.ratelimit import FixedWindow, TokenBucket

    fixed = FixedWindow(2)
    assert fixed.try_acquire(10.8) is None
    assert fixed.try_acquire(10.9) is None
    assert fixed.try_acquire(10.95) == pytest.approx(0.05)
    assert fixed.try_acquire(11.0) is None  # a new calendar second: 3 within 0.2 s
    bucket = TokenBucket(2)
    assert bucket.try_acquire(0.0) is None
    assert bucket.try_acquire(0.0) is None
    assert bucket.try_acquire(0.1) == pytest.approx(0.4)  # 0.2 token, 0.8 missing at 2/s
    assert bucket.try_acquire(0.5) is None


def test_window_max_is_exact_even_when_the_clock_steps_back() -> None:
    from worker.sandbox.stats import WindowMax

    window = WindowMax()
    for at in (0.0, 0.5, 0.99, 1.0, 1.5, 3.0):
        window.add(at)
    assert window.maximum == 3  # (0.0, 1.0] holds 0.5, 0.99, 1.0: 0.0 is out
    window.add(0.7)  # the wall clock stepped back
    assert window.maximum == 4  # (0.0, 1.0] and (0.5, 1.5] now hold four each


def test_notation_parsers() -> None:
    from worker.sandbox.notation import parse_outcomes, parse_per_endpoint, parse_range

    assert parse_range("0.5:2") == (0.5, 2.0)
    assert parse_range("3") == (3.0, 3.0)
    with pytest.raises(ValueError, match="MIN <= MAX"):
        parse_range("2:1")
    assert parse_outcomes("paid=3,cancelled=1") == {"paid": 0.75, "expired": 0.0, "cancelled": 0.25}
    assert parse_per_endpoint("get=0.5", float, 0.0) == {"token": 0.0, "create": 0.0, "get": 0.5}
    assert parse_per_endpoint("0.1", float, 0.0) == dict.fromkeys(("token", "create", "get"), 0.1)
    with pytest.raises(ValueError, match="unknown endpoint"):
        parse_per_endpoint("poll=0.5", float, 0.0)


def test_first_request_on_a_connection_is_stamped_when_it_arrived_not_when_accepted() -> None:
    """The rate limit judges when a request reached the server: a connection accepted late
    (a busy emulator) must not shift its first request's arrival to the accept."""
    from worker.sandbox.config import SandboxConfig
    from worker.sandbox.server import SandboxHandler, SandboxServer

    arrivals: list[float] = []

    class Recording(SandboxHandler):
        def parse_request(self) -> bool:
            ok = super().parse_request()
            arrivals.append(self.arrived)
            return ok

    server = SandboxServer(SandboxConfig(host="127.0.0.1", port=0))

    def stamping() -> bool:
        # Linux turns receive timestamps on system-wide in deferred work after the first
        # socket asks: wait until a probe connection's bytes come with one.
        with socket.create_connection(server.server_address[:2]) as probe:
            probe.sendall(b"x")
            connection, _ = server.get_request()
            with connection:
                _, ancillary, _, _ = connection.recvmsg(1, 64, socket.MSG_PEEK)
        return bool(ancillary)

    wait_until(stamping, timeout=5, what="kernel receive timestamps")
    server.RequestHandlerClass = Recording
    try:
        with socket.create_connection(server.server_address[:2]) as client:
            client.sendall(b"GET /_admin/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            sent_at = time.time()
            time.sleep(0.3)  # the scenario itself: the server gets round to accepting late
            connection, address = server.get_request()
            accepted_at = time.time()
            server.finish_request(connection, address)
            server.shutdown_request(connection)
            assert client.recv(100).startswith(b"HTTP/1.1 ")
    finally:
        server.server_close()
    assert len(arrivals) == 1
    assert accepted_at - sent_at >= 0.3
    assert sent_at - 0.05 <= arrivals[0] <= sent_at + 0.05
