"""The sandbox's state and API behaviour: tokens, payments, limits, faults, stats.

One lock guards everything; each API request takes it once, for its whole decision (rate
limit, authentication, fault draw, processing, counting), so the recorded timestamps are in
the order the limiter saw them. Latency and I/O happen outside the lock.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import math
import random
import re
import secrets
import threading
import time
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

from worker.sandbox.answers import Answer, ApiError, json_answer, malformed_body
from worker.sandbox.config import SandboxConfig
from worker.sandbox.faults import NO_FAULT, FaultDraw, FaultSettings, draw_faults
from worker.sandbox.lifecycle import TERMINAL, LifecycleSettings, Plan, draw_plan
from worker.sandbox.payments import Payment
from worker.sandbox.ratelimit import Limiter, make_limiter, retry_after_seconds
from worker.sandbox.stats import ClientStats
from worker.sandbox.validation import parse_create

ANONYMOUS = "(anonymous)"  # stats key for requests that name no API key we can tell
TOKEN_ROUTE = "POST /oauth/token"  # noqa: S105 (a route, not a password)
MAX_SEED = 100_000  # payments one POST /_admin/seed may create (the lock is held meanwhile)
SEED_AMOUNT = "10"  # what a seeded payment was created with
SEED_REDIRECT_URL = "https://shop.example/thanks"
_PAYMENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class Token:
    client_id: str
    expires_at: float


class Sandbox:
    """The emulated API. Thread-safe; every public method may be called from any thread."""

    def __init__(self, config: SandboxConfig, *, base_url: str = "") -> None:
        self.config = config
        self.base_url = base_url  # for the hosted-page ``url``; set once the port is known
        self._lifecycle = LifecycleSettings(
            pay_after=config.pay_after,
            pay_after_tail=config.pay_after_tail,
            outcomes=dict(config.outcomes),
            stay_pending=config.stay_pending,
            expire_after=config.expire_after,
            unknown_status=config.unknown_status,
            unknown_status_name=config.unknown_status_name,
        )
        self._lock = threading.Lock()
        self._generation = 0
        self._init_state(config.faults)

    def _init_state(self, faults: FaultSettings) -> None:
        """Forget everything but the configuration (called under the lock, or at start)."""
        seed = f"{self.config.seed}/{self._generation}"
        self.faults = faults
        self._fault_rng = random.Random(f"faults/{seed}")
        self._token_parity = random.Random(f"tokens/{seed}").randrange(2)
        self._tokens_issued = 0
        self._tokens: dict[str, Token] = {}
        self._payments: dict[str, Payment] = {}
        self._limiters: dict[str, Limiter] = {}
        self._clients: dict[str, ClientStats] = {}
        self._creates_by_reference: dict[str, dict[str, int]] = {}
        self._dropped: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- API requests
    def request(
        self,
        endpoint: str,
        route: str,
        *,
        authorization: str,
        content_type: str,
        body: bytes,
        payment_id: str = "",
        arrived: float | None = None,
    ) -> Answer:
        """Handle one API request to ``endpoint`` (token/create/get) and say what to answer.

        Order: identify the key -> rate limit (429) -> authenticate (401/403) -> draw faults
        (5xx without processing) -> process (400/404/422/200) -> drop or malform a success.
        """
        with self._lock:
            # Judged at its arrival (kernel receive stamp or request line), not now: the rate
            # limit is about when the client sent it. Arrivals may come out of order across
            # threads; the limiters judge each exactly at its own time.
            now = time.time() if arrived is None else arrived
            if endpoint == "token":
                client_id = _basic_client_id(authorization)
            else:
                client_id = self._bearer_client_id(authorization)
            stats = self._client_stats(client_id or ANONYMOUS)
            wait = self._limiter(client_id).try_acquire(now) if client_id else None
            stats.arrival(now, accepted=wait is None)
            draw = NO_FAULT
            try:
                if wait is not None:
                    raise ApiError(
                        429,
                        "rate_limited",
                        "Too many requests: the limit is "
                        f"{self.config.rate:g} requests per second per API key",
                        headers=self._retry_after_headers(wait, now),
                    )
                if endpoint != "token":
                    self._authenticate(authorization, now)
                draw = draw_faults(self.faults, endpoint, self._fault_rng)
                if draw.error_status is not None:
                    answer = self._injected_error(draw.error_status)
                elif endpoint == "token":
                    answer = self._issue_token(authorization, content_type, body, now)
                elif endpoint == "create":
                    answer = self._create(client_id or "", body, now, drop=draw.drop)
                else:
                    answer = self._get(client_id or "", payment_id, now, draw)
            except ApiError as exc:
                answer = exc.answer()
            if answer.status == 200 and draw.malformed is not None:
                answer.body = malformed_body(draw.malformed, answer.body)
            fault = draw.kind if (answer.status == 200 or draw.error_status) else None
            status = "dropped" if answer.drop else str(answer.status)
            stats.answered(route, status, fault=fault)
        answer.latency = draw.latency
        return answer

    def _client_stats(self, client_id: str) -> ClientStats:
        stats = self._clients.get(client_id)
        if stats is None:
            stats = self._clients[client_id] = ClientStats()
        return stats

    def _limiter(self, client_id: str) -> Limiter:
        limiter = self._limiters.get(client_id)
        if limiter is None:
            limiter = make_limiter(self.config.limit_mode, self.config.rate)
            self._limiters[client_id] = limiter
        return limiter

    def _retry_after_headers(self, wait: float, now: float) -> list[tuple[str, str]]:
        seconds = retry_after_seconds(wait)
        if self.config.retry_after == "none":
            return []
        if self.config.retry_after == "date":
            # An HTTP date has whole seconds: round the instant up so it is never early.
            return [("Retry-After", formatdate(math.ceil(now + wait), usegmt=True))]
        return [("Retry-After", str(seconds))]

    def _injected_error(self, status: int) -> Answer:
        headers: list[tuple[str, str]] = []
        if status == 503 and self.faults.error_retry_after is not None:
            headers.append(("Retry-After", str(math.ceil(self.faults.error_retry_after))))
        names = {500: "internal_error", 502: "bad_gateway", 503: "service_unavailable"}
        code = names.get(status, "server_error")
        return ApiError(status, code, f"Injected fault: {code}", headers=headers).answer()

    # ---------------------------------------------------------------- tokens
    def _bearer_client_id(self, authorization: str) -> str | None:
        token = self._tokens.get(_bearer(authorization))
        return token.client_id if token else None

    def _authenticate(self, authorization: str, now: float) -> None:
        token = self._tokens.get(_bearer(authorization))
        if token is None:
            raise ApiError(401, "unauthorized", "Missing or unknown bearer token")
        if now >= token.expires_at:
            raise ApiError(401, "token_expired", "The access token has expired")

    def _issue_token(
        self, authorization: str, content_type: str, body: bytes, now: float
    ) -> Answer:
        credentials = _basic_credentials(authorization)
        if credentials is None:
            raise ApiError(
                401,
                "unauthorized",
                "Basic authentication with client_id:client_secret needed",
                headers=[("WWW-Authenticate", 'Basic realm="oauth"')],
            )
        client_id, secret = credentials
        expected = self.config.clients.get(client_id)
        if expected is None or not secrets.compare_digest(expected, secret):
            raise ApiError(403, "invalid_client", "Invalid client credentials")
        if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            raise ApiError(
                400,
                "invalid_request",
                "Content-Type must be application/x-www-form-urlencoded",
                {"Content-Type": "must be application/x-www-form-urlencoded"},
            )
        form = parse_qs(body.decode("latin-1"))
        grant = form.get("grant_type", [""])[0]
        if grant != "client_credentials":
            raise ApiError(
                400,
                "unsupported_grant_type",
                "grant_type must be client_credentials",
                {"grant_type": "must be client_credentials"},
            )
        access_token = secrets.token_urlsafe(24)
        ttl = self.config.token_ttl
        self._tokens[access_token] = Token(client_id=client_id, expires_at=now + ttl)
        # The docs show both spellings: alternate them, starting from a seeded one.
        token_type = ("bearer", "Bearer")[(self._token_parity + self._tokens_issued) % 2]
        self._tokens_issued += 1
        expires_in: float = int(ttl) if float(ttl).is_integer() else ttl
        data = {"access_token": access_token, "expires_in": expires_in, "token_type": token_type}
        return json_answer(200, data)

    # ---------------------------------------------------------------- payments
    def _create(self, client_id: str, body: bytes, now: float, *, drop: bool) -> Answer:
        request = parse_create(body, max_amount=self.config.max_amount)
        payment = self._new_payment(
            client_id,
            reference_id=request.reference_id,
            amount=request.amount,
            currency=request.currency,
            redirect_url=request.redirect_url,
            now=now,
        )
        if drop:
            dropped = {"client_id": client_id, "reference_id": request.reference_id}
            self._dropped.append({**dropped, "payment_id": payment.id})
            return Answer(status=200, drop=True)
        return json_answer(200, payment.view(self._status(payment, now)))

    def _new_payment(
        self,
        client_id: str,
        *,
        reference_id: str | None,
        amount: str,
        currency: str,
        redirect_url: str,
        now: float,
    ) -> Payment:
        """Make, draw and keep the next payment (its id and plan follow the creation index)."""
        index = len(self._payments)
        digest = hashlib.sha256(
            f"{self.config.seed}/{self._generation}/{index}".encode()
        ).hexdigest()
        payment_id = f"pr_{digest[:24]}"
        plan = draw_plan(
            self._lifecycle,
            seed=self.config.seed,
            generation=self._generation,
            index=index,
            created_at=now,
        )
        payment = Payment(
            id=payment_id,
            client_id=client_id,
            reference_id=reference_id,
            amount=amount,
            currency=currency,
            redirect_url=redirect_url,
            url=f"{self.base_url}/pay/{payment_id}",
            created_at=now,
            plan=plan,
        )
        self._payments[payment_id] = payment
        if reference_id is not None:
            by_ref = self._creates_by_reference.setdefault(client_id, {})
            by_ref[reference_id] = by_ref.get(reference_id, 0) + 1
        return payment

    def _get(self, client_id: str, payment_id: str, now: float, draw: FaultDraw) -> Answer:
        if not _PAYMENT_ID.match(payment_id):
            raise ApiError(400, "invalid_id", "Malformed payment request id", {"id": "invalid"})
        payment = self._payments.get(payment_id)
        if payment is None or payment.client_id != client_id:
            # Another key's payment is not revealed: same answer as an unknown id.
            raise ApiError(404, "not_found", "Payment request not found")
        payment.polled(now)
        self._client_stats(client_id).polled(now)
        status = self._status(payment, now)
        if status in TERMINAL and payment.first_seen_terminal_at is None and not draw.malformed:
            payment.first_seen_terminal_at = now
        return json_answer(200, payment.view(status))

    def _status(self, payment: Payment, now: float) -> str:
        return payment.plan.status(now, self.config.unknown_status_name)

    # ---------------------------------------------------------------- admin
    def hosted_page(self, payment_id: str) -> Answer:
        """The payer's hosted page (no auth, not counted): a tiny HTML page with the status."""
        with self._lock:
            payment = self._payments.get(payment_id)
            status = self._status(payment, time.time()) if payment else None
        if payment is None:
            return Answer(status=404, body=b"not found", content_type="text/plain")
        html = f"<html><body><h1>Payment {payment.id}</h1><p>{status}</p></body></html>"
        return Answer(status=200, body=html.encode(), content_type="text/html; charset=utf-8")

    def set_faults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply fault changes (see FaultSettings.with_changes) and return the new settings."""
        with self._lock:
            self.faults = self.faults.with_changes(changes)
            return self.faults.public()

    def reset(self, *, keep_faults: bool = False) -> None:
        """Forget tokens, payments, limits and stats; restore the start faults unless told."""
        with self._lock:
            self._generation += 1
            self._init_state(self.faults if keep_faults else self.config.faults)

    def seed(self, client_id: str, count: int, reference_prefix: str) -> list[str]:
        """Create ``count`` payments of ``client_id`` now, as its creates would (same ids,
        plans and create counts), but outside the API: no rate limit, no request counted.
        References are ``reference_prefix`` + 0, 1, ...; returns the payment ids in order.
        ValueError naming the field if the client is unknown or the count out of range."""
        if client_id not in self.config.clients:
            raise ValueError("client_id: not a client of this sandbox")
        if not 1 <= count <= MAX_SEED:
            raise ValueError(f"count: must be an integer in [1, {MAX_SEED}]")
        with self._lock:
            now = time.time()
            return [
                self._new_payment(
                    client_id,
                    reference_id=f"{reference_prefix}{i}",
                    amount=SEED_AMOUNT,
                    currency="USD",
                    redirect_url=SEED_REDIRECT_URL,
                    now=now,
                ).id
                for i in range(count)
            ]

    def force_status(self, payment_id: str, status: str) -> dict[str, Any]:
        """Make a payment terminal now with ``status`` (for tests); KeyError if unknown."""
        if status not in TERMINAL:
            raise ValueError(f"status must be one of {sorted(TERMINAL)}")
        with self._lock:
            payment = self._payments[payment_id]
            now = time.time()
            if self._status(payment, now) not in TERMINAL:
                payment.plan = Plan(outcome=status, terminal_at=now, unknown_from=None)
            return payment.view(self._status(payment, now))

    def stats(self, *, payments: bool = True, times: bool = False) -> dict[str, Any]:
        """The stats document (schema in the package docstring)."""
        with self._lock:
            now = time.time()
            data: dict[str, Any] = {
                "now": now,
                "config": self.config.public(),
                "faults": self.faults.public(),
                "clients": {cid: s.public(times=times) for cid, s in self._clients.items()},
                "creates_by_reference": {
                    cid: dict(refs) for cid, refs in self._creates_by_reference.items()
                },
                "duplicates": [
                    {"client_id": cid, "reference_id": ref, "count": count}
                    for cid, refs in self._creates_by_reference.items()
                    for ref, count in refs.items()
                    if count > 1
                ],
                "payments_count": len(self._payments),
                "dropped_creates": [dict(d) for d in self._dropped],
            }
            if payments:
                data["payments"] = {
                    p.id: self._payment_stats(p, now) for p in self._payments.values()
                }
            return data

    def _payment_stats(self, payment: Payment, now: float) -> dict[str, Any]:
        return payment.stats(self._status(payment, now))


def _basic_credentials(authorization: str) -> tuple[str, str] | None:
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    return (client_id, secret) if sep and client_id else None


def _basic_client_id(authorization: str) -> str | None:
    """The client_id of a Basic header (the token call's rate-limit key, secret or not)."""
    credentials = _basic_credentials(authorization)
    return credentials[0] if credentials else None


def _bearer(authorization: str) -> str:
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""
