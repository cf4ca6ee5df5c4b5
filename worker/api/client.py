"""ApiClient: the two calls paypoll makes (create, get) and the token call behind them.

Every HTTP exchange, the token call included, follows one path (``_exchange``): take a slot from
the rate limiter, send with connect and read timeouts, read a bounded body, map the answer to a
result or to the exception tree of worker/errors.py, then record one metric and one
``api.request`` log event. Callers never see a ``requests`` exception.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager, nullcontext
from typing import TypeVar
from urllib.parse import quote, urlsplit

import requests
import structlog
from redis import Redis, RedisError
from requests.structures import CaseInsensitiveDict

from worker import metrics
from worker.api.auth import IssuedToken, TokenCache, parse_token
from worker.api.call_log import record_call
from worker.api.direct import ConnectFailed, DirectTransport, ExchangeFailed, process_transport
from worker.api.limiting import Limiter, UnlimitedLimiter
from worker.api.models import BadPayload, PaymentRequest, parse_payment
from worker.api.responses import error_for_status, malformed
from worker.api.send_gate import ApiSession, GateRefused, LastCheck, plan_send, send_gate
from worker.api.transport import (
    encode_body,
    is_connection_aborted,
    prepare,
    process_session,
    read_body,
    transport_error,
)
from worker.errors import (
    ApiError,
    NotSent,
    RateLimited,
    SlotMissed,
    TransportError,
    Unauthorized,
    ValidationError,
)
from worker.keys import Keys
from worker.logs import register_secret
from worker.settings import Account, Settings

T = TypeVar("T")
#: What sending one request gives: its status, its body (None when longer than MAX_BODY) and
#: its headers (case-insensitive).
Exchanged = tuple[int, bytes | None, Mapping[str, str]]

#: Largest answer body read: a PaymentRequest is a few hundred bytes; more is not our API.
MAX_BODY = 1_048_576
TOKEN_PATH = "/oauth/token"  # noqa: S105  (a path, not a password)
# A call with a ``before_send`` step (a create's sent-mark) wakes that long before its
# rate-limit slot to run it, then sleeps the rest; at most this much (the mark is never older
# than this when the request leaves, so a kill in between rarely leaves a create ambiguous).
BEFORE_SEND_LEAD_MAX = 0.010

log = structlog.get_logger("worker.api")


class BeforeSendLead:
    """How long before its slot a call runs its ``before_send`` step: the longest such step
    of late (each call's duration, the older ones decaying by ``decay`` per call), at most
    ``cap``. Long enough that the step rarely makes the call late for its slot, short enough
    that a create is marked sent only just before it is."""

    def __init__(self, cap: float = BEFORE_SEND_LEAD_MAX, decay: float = 0.9) -> None:
        self.cap = cap
        self.decay = decay
        self.seconds = cap / 4

    def observe(self, took: float) -> None:
        """One ``before_send`` step took ``took`` seconds."""
        self.seconds = min(self.cap, max(took, self.seconds * self.decay))


def _limiter_failed(exc: RedisError, account: Account, endpoint: str) -> NotSent:
    """The error for a call given up because the limiter's Redis failed: nothing was sent."""
    return NotSent(
        f"the rate limiter's Redis failed, nothing was sent ({type(exc).__name__})",
        account=account.name,
        endpoint=endpoint,
    )


class ApiClient:
    """The Alternative Payments API, as paypoll uses it: thread-safe, one per process.

    ``redis`` holds the shared token cache; ``limiter`` is asked for a slot before every HTTP
    call (default: UnlimitedLimiter, for tools without one). Calls go out on ``transport``
    (default: the process's DirectTransport), except through a proxy the environment names:
    those take the process's pooled requests Session. A ``session`` given sends every call
    through it instead (``transport`` is then unused).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        redis: Redis,
        limiter: Limiter | None = None,
        session: requests.Session | None = None,
        keys: Keys | None = None,
        transport: DirectTransport | None = None,
    ) -> None:
        self._settings = settings
        self._limiter: Limiter = limiter if limiter is not None else UnlimitedLimiter()
        self._session = session
        self._transport = transport
        self._timeout = (settings.connect_timeout, settings.read_timeout)
        self._base = settings.api_url.rstrip("/")
        self._payments = self._base + "/" + settings.payments_path.strip("/")
        # A held rate-limit slot waiting for this thread's next booking (see _take_hold).
        self._holds = threading.local()
        self._before_send_lead = BeforeSendLead()
        self.tokens = TokenCache(
            redis=redis,
            keys=keys if keys is not None else settings.keys(),
            fetch=self._fetch_token,
            renew_before=settings.token_renew_before,
            on_token=register_secret,
        )
        for account in settings.accounts.values():
            # Known before the first call, so the log redaction catches them anywhere.
            register_secret(account.client_secret.reveal())
            register_secret(self._basic(account))

    def __repr__(self) -> str:
        return f"ApiClient(api_url={self._base!r}, accounts={sorted(self._settings.accounts)!r})"

    @property
    def session(self) -> requests.Session:
        """The Session in use (the process's pooled one unless one was given)."""
        return self._session if self._session is not None else process_session()

    # --- the calls ------------------------------------------------------------------------------

    def create_payment(
        self,
        account: str,
        *,
        amount: str | int,
        currency: str,
        redirect_url: str,
        reference_id: str | None = None,
        max_wait: float | None = None,
        hold: float | None = None,
        before_send: Callable[[], None] | None = None,
    ) -> PaymentRequest:
        """POST a payment request for ``account`` (an alias) and return what the API made.

        ``hold`` is a rate-limit slot an earlier ``SlotTooFar`` held for this job (its
        ``hold``): the call uses it instead of booking one.

        ``before_send`` is called once the rate-limit slot and the token are in hand, right
        before the request goes on the wire; if it raises, nothing is sent and its exception
        propagates (the create actor marks the payment "sent" there, see worker/steps/create.py). It
        runs before each attempt: twice when a 401 forced one token renewal.

        Sent once: never retried here. Raises RejectedInput (400/422), RateLimited, ServerError,
        NotSent (safe to retry), Ambiguous (sent, answer lost: the payment may exist),
        MalformedCreateResponse (2xx with an unusable body; also an Ambiguous), Unauthorized,
        CredentialsRefused, SlotTooFar (nothing sent), UnknownAccount.
        """
        acct = self._settings.account(account)
        body: dict[str, str] = {
            "amount": str(amount),
            "currency": currency,
            "redirect_url": redirect_url,
        }
        if reference_id is not None:
            body["reference_id"] = reference_id
        return self._authorized(
            acct,
            "create",
            "POST",
            self._payments,
            parse_payment,
            json_body=body,
            max_wait=max_wait,
            hold=hold,
            before_send=before_send,
        )

    def get_payment(
        self,
        account: str,
        payment_id: str,
        *,
        max_wait: float | None = None,
        hold: float | None = None,
    ) -> PaymentRequest:
        """GET payment request ``payment_id`` of ``account`` (``hold``: as in create_payment).

        A GET is idempotent: a connection the server closed without answering (typically a stale
        pooled keep-alive connection) is retried once at once, and every TransportError it
        raises has ``retry_safe`` True. Raises NotFound, MalformedResponse (also when the
        answer's id is not ``payment_id``) and the errors of create_payment.
        """
        if not payment_id:
            raise ValidationError("payment_id", "must be a non-empty string")
        acct = self._settings.account(account)
        url = f"{self._payments}/{quote(payment_id, safe='')}"

        def parse(data: object) -> PaymentRequest:
            payment = parse_payment(data)
            if payment.id != payment_id:
                raise BadPayload("the answer is about another payment id")
            return payment

        return self._authorized(acct, "get", "GET", url, parse, max_wait=max_wait, hold=hold)

    def check_credentials(self, account: str, *, max_wait: float | None = None) -> float:
        """One fresh token call for ``account`` through the limiter, bypassing and leaving the
        shared token cache as it is (`paypoll doctor`): the seconds the issued token is valid.
        Raises CredentialsRefused (403) and the errors of any call; never returns the token."""
        issued = self._fetch_token(self._settings.account(account), max_wait)
        register_secret(issued.access_token)
        return issued.expires_in

    # --- inside ---------------------------------------------------------------------------------

    @staticmethod
    def _basic(account: Account) -> str:
        pair = f"{account.client_id}:{account.client_secret.reveal()}".encode()
        return base64.b64encode(pair).decode("ascii")

    def _fetch_token(self, account: Account, max_wait: float | None) -> IssuedToken:
        """The contract's client_credentials call (api-contract.md, "Authentication")."""
        headers = {
            "Authorization": f"Basic {self._basic(account)}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        try:
            return self._exchange(
                account,
                "token",
                "POST",
                self._base + TOKEN_PATH,
                parse_token,
                headers=headers,
                form_body="grant_type=client_credentials",
                max_wait=max_wait,
                attempt=1,
                hold=self._take_hold(),
            )
        except SlotMissed:
            raise  # our own lateness (a starved CPU), not the token service's: counted as such
        except ApiError as exc:
            # Feeds the token-failure panel and alerts (403: PaypollCredentialsRefused). The
            # label is the status or the error's class, never its text.
            metrics.record_token_failure(account.name, exc.outcome)
            raise

    def _take_hold(self) -> float | None:
        """The slot held for this thread's current call, once: whichever of its exchanges books
        first (a token renewal, else the call itself) uses it; the others book their own."""
        hold: float | None = getattr(self._holds, "slot", None)
        self._holds.slot = None
        return hold

    def _authorized(
        self,
        account: Account,
        endpoint: str,
        method: str,
        url: str,
        parse: Callable[[object], T],
        *,
        json_body: Mapping[str, str] | None = None,
        max_wait: float | None = None,
        hold: float | None = None,
        before_send: Callable[[], None] | None = None,
    ) -> T:
        """An exchange with the account's bearer token; one renewal after a 401. ``hold`` is
        used by the first exchange that books a slot (a token renewal, else the call's first
        attempt); the others book their own."""
        with self._holding(hold):
            renewed = False
            retried_stale = False
            attempt = 0
            while True:
                attempt += 1
                token = self.tokens.get(account, max_wait=max_wait)
                try:
                    return self._exchange(
                        account,
                        endpoint,
                        method,
                        url,
                        parse,
                        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                        json_body=json_body,
                        max_wait=max_wait,
                        hold=self._take_hold(),
                        attempt=attempt,
                        before_send=before_send,
                    )
                except Unauthorized as exc:
                    if exc.status != 401 or renewed:
                        raise
                    # Expired or revoked before its TTL: forget it (if nobody replaced it yet) and
                    # try once more with a fresh one; a second 401 is raised.
                    renewed = True
                    self.tokens.invalidate(account.name, token)
                except TransportError as exc:
                    if method != "GET":
                        raise
                    exc.retry_safe = True  # a GET has no effect to repeat
                    if retried_stale or not is_connection_aborted(exc):
                        raise
                    retried_stale = True

    @contextmanager
    def _holding(self, hold: float | None) -> Iterator[None]:
        """Offer ``hold`` to this thread's next booking while a call runs (``_take_hold``)."""
        self._holds.slot = hold
        try:
            yield
        finally:
            self._holds.slot = None

    def _sender(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        json_body: Mapping[str, str] | None,
        form_body: str | None,
    ) -> Callable[[Callable[[], LastCheck]], Exchanged]:
        """The request, built now (before the slot: nothing avoidable happens between a slot
        and the write), as a function that sends it, running the gate it is given once
        connected, and returns (status, body or None when too long, headers). It goes out on
        the direct path (worker/api/direct.py) unless a Session was handed to the client or a
        proxy applies; then through requests. Raises GateRefused (nothing written), requests'
        exceptions, ConnectFailed and ExchangeFailed."""
        direct = self._direct_transport(url)
        if direct is not None:
            body, all_headers = encode_body(headers, json_body, form_body)
            timeouts = self._timeout

            def send_direct(gate: Callable[[], LastCheck]) -> Exchanged:
                answer = direct.exchange(
                    method,
                    url,
                    headers=all_headers,
                    body=body,
                    gate=gate,
                    connect_timeout=timeouts[0],
                    read_timeout=timeouts[1],
                    limit=MAX_BODY,
                )
                return answer.status, answer.body, CaseInsensitiveDict(answer.headers)

            return send_direct
        session = self.session
        prepared = prepare(
            session, method, url, headers=headers, json_body=json_body, form_body=form_body
        )

        def send_by_requests(gate: Callable[[], LastCheck]) -> Exchanged:
            gated, proxies = plan_send(session, prepared)
            if not gated:
                # Through a proxy our pools are not used: the gate and its check run here.
                try:
                    check = gate()
                    if check is not None:
                        # Its after-write fence is not run: the write happens inside
                        # session.send, and a reading after the whole exchange would call
                        # every proxied call late.
                        check()
                except Exception as exc:
                    raise GateRefused(exc) from exc
            with send_gate(gate) if gated else nullcontext() as pending:
                response = session.send(
                    prepared,
                    proxies=proxies,
                    timeout=self._timeout,
                    stream=True,  # so the body is read with a size bound
                    allow_redirects=False,  # a redirect would re-send credentials elsewhere
                )
            if pending is not None and not pending.ran:  # pragma: no cover - a bug if seen
                log.error("api.send_gate_bypassed", url_path=urlsplit(url).path)
            with closing(response):
                return response.status_code, read_body(response, MAX_BODY), response.headers

        return send_by_requests

    def _direct_transport(self, url: str) -> DirectTransport | None:
        """The process's direct transport for ``url``, or None when the requests path applies:
        a Session was handed to the client, or the environment names a proxy for the URL."""
        if self._session is not None:
            return None
        session = process_session()
        if isinstance(session, ApiSession) and session.proxies_for(url):
            return None
        return self._transport if self._transport is not None else process_transport()

    def _exchange(
        self,
        account: Account,
        endpoint: str,
        method: str,
        url: str,
        parse: Callable[[object], T],
        *,
        headers: Mapping[str, str],
        json_body: Mapping[str, str] | None = None,
        form_body: str | None = None,
        max_wait: float | None,
        attempt: int,
        hold: float | None = None,
        before_send: Callable[[], None] | None = None,
    ) -> T:
        """One HTTP call: limiter slot, send, bounded read, map, measure, log."""
        # Built before the slot is taken: the time between a slot and the request on the wire
        # is the jitter the limiter's margin must absorb, so nothing avoidable happens there
        # (preparing reads the environment and ~/.netrc, and serialises the body).
        send = self._sender(method, url, headers, json_body, form_body)
        # SlotTooFar propagates from here: nothing was sent, nothing is recorded as a call.
        try:
            wait_for_slot = self._limiter.book(
                account.name, account.rate, max_wait=max_wait, hold=hold
            )
        except RedisError as exc:
            raise _limiter_failed(exc, account, endpoint) from exc
        waited = 0.0
        started = time.perf_counter()  # reset when the slot is reached (a failed connect never is)

        def when_connected() -> Callable[[], Callable[[], None]]:
            # The last step before the request is written, once the connection is made (a
            # connect after the slot would make the call late): sleep until the slot, then
            # let the caller mark the request as sent. Returns the lateness check that the
            # connection runs at the first write.
            nonlocal waited, started
            try:
                # The caller's mark (a Redis write, under Sentinel a replica's ack too) is
                # made just before the slot rather than after it: its time no longer counts
                # against the slot's lateness (measured: replica WAITs of 1-10 ms made 13% of
                # a burst's creates miss their slots).
                lead = self._before_send_lead.seconds if before_send is not None else 0.0
                slot = wait_for_slot(lead)
            except RedisError as exc:
                raise _limiter_failed(exc, account, endpoint) from exc
            waited = slot.waited
            if before_send is not None:
                marking = time.perf_counter()
                before_send()
                self._before_send_lead.observe(time.perf_counter() - marking)
                slot.wait_out()
            started = time.perf_counter()

            def still_on_time() -> Callable[[], None]:
                # Run again at the write: the caller's step (a Redis write: with appendfsync
                # always it can take tens of milliseconds) and building the request ran after
                # the slot's lateness check, and a starved host can deschedule this thread
                # anywhere in between. Nothing is written yet, so giving up is safe, and
                # cheaper than a 429 pausing the key.
                if slot.late():
                    raise SlotMissed(
                        "too late for its rate-limit slot once ready to send; nothing was sent",
                        account=account.name,
                        endpoint=endpoint,
                    )
                return written

            def written() -> None:
                # Right after the first write: this thread may have lost the CPU between the
                # check above and the write; if the write came too late, the key is fenced.
                try:
                    slot.sent()
                except Exception as exc:
                    # The call is out: nothing here may turn it into a failed exchange (for a
                    # create, an ambiguous one). Only the fence failed; the next calls keep
                    # their slots.
                    log.warning("api.fence_failed", account=account.name, error=type(exc).__name__)

            return still_on_time

        status: int | None = None
        error: ApiError | None = None
        refused: BaseException | None = None
        try:
            try:
                status, body, response_headers = send(when_connected)
            except GateRefused as exc:
                # Nothing was written: not an API call. The reason (SlotTooFar, NotSent, the
                # caller's own refusal) is raised as it is.
                refused = exc.reason
                raise exc.reason from None
            except (requests.RequestException, ConnectFailed, ExchangeFailed) as exc:
                raise transport_error(
                    exc,
                    account=account.name,
                    endpoint=endpoint,
                    connect_timeout=self._timeout[0],
                    read_timeout=self._timeout[1],
                ) from exc
            if body is None:
                raise malformed(
                    f"body larger than {MAX_BODY} bytes",
                    account=account.name,
                    endpoint=endpoint,
                    status=status,
                )
            if not 200 <= status <= 299:
                raise error_for_status(
                    status, response_headers, body, account=account.name, endpoint=endpoint
                )
            try:
                return parse(json.loads(body))
            except (ValueError, RecursionError) as exc:
                # BadPayload messages name fields, never values; a JSON error is described by
                # its class only (its .doc would be the body: a token answer holds the token).
                problem = str(exc) if isinstance(exc, BadPayload) else "body is not JSON"
                raise malformed(
                    problem, account=account.name, endpoint=endpoint, status=status
                ) from None
        except ApiError as exc:
            error = exc
            if isinstance(exc, RateLimited):
                try:
                    self._limiter.penalize(account.name, exc.retry_after)
                except RedisError as redis_exc:
                    # The 429 is what the caller must see; the fleet-wide pause is best effort.
                    log.warning(
                        "api.penalize_failed",
                        account=account.name,
                        error=type(redis_exc).__name__,
                    )
            raise
        finally:
            if refused is None:
                record_call(account.name, endpoint, method, status, error, started, waited, attempt)
