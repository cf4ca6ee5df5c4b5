"""The exception tree of paypoll: one root, and the cases a caller must tell apart.

Every error carries what an operator needs (account alias, HTTP status, the API's code and
message, ``retry_after``, whether a retry is safe) and never a secret or a token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class PaypollError(Exception):
    """Root of every error paypoll raises on purpose."""


class ConfigError(PaypollError):
    """Settings are missing or malformed; the message names the variable or file and line."""


class ValidationError(PaypollError):
    """A payment was refused before anything was enqueued.

    ``field`` names the offending input, ``reason`` says what was expected. A payment with
    several bad fields is refused once with all of them: ``problems`` lists every (field,
    reason), the first of them being ``field`` and ``reason`` (issue 15).
    """

    def __init__(
        self,
        field: str,
        reason: str,
        *,
        line: int | None = None,
        problems: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.field = field
        self.reason = reason
        self.line = line
        self.problems: tuple[tuple[str, str], ...] = tuple(problems) or ((field, reason),)
        where = f"line {line}: " if line is not None else ""
        super().__init__(where + "; ".join(f"{f}: {r}" for f, r in self.problems))

    @classmethod
    def combine(cls, errors: Iterable[ValidationError]) -> ValidationError:
        """One error listing every problem of ``errors`` (the error itself when only one)."""
        errors = list(errors)
        if len(errors) == 1:
            return errors[0]
        problems = [problem for error in errors for problem in error.problems]
        return cls(problems[0][0], problems[0][1], problems=problems)


class UnknownAccount(ValidationError):
    """The account alias is not configured."""

    def __init__(self, account: str) -> None:
        super().__init__("account", f"unknown account {account!r}")


class ApiError(PaypollError):
    """Any failure of a call to the Alternative Payments API.

    ``retry_safe`` is True when repeating the call cannot cause a second effect.
    """

    retry_safe: bool = False

    def __init__(
        self,
        message: str,
        *,
        account: str,
        endpoint: str = "",
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message
        self.account = account
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.retry_after = retry_after
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = [f"account={self.account}"]
        if self.endpoint:
            parts.append(f"endpoint={self.endpoint}")
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.code:
            parts.append(f"code={self.code}")
        if self.retry_after is not None:
            parts.append(f"retry_after={self.retry_after:g}")
        return f"{self.message} ({', '.join(parts)})"

    @property
    def outcome(self) -> str:
        """A short label for metrics and logs: the status code, or the error class name."""
        return str(self.status) if self.status is not None else type(self).__name__


class RejectedInput(ApiError):
    """400/422: the API refused the request's content. Never retried."""

    def __init__(
        self,
        message: str,
        *,
        validation_errors: Mapping[str, str] | None = None,
        **kwargs: object,
    ) -> None:
        self.validation_errors = dict(validation_errors or {})
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class NotFound(ApiError):
    """404: the payment request does not exist for this account."""


class CredentialsRefused(ApiError):
    """403 on the token call: the account's client_id/client_secret are wrong. Stops the account."""


class Unauthorized(ApiError):
    """401 that persisted after renewing the token once."""


class RateLimited(ApiError):
    """429. ``retry_after`` holds the server's Retry-After in seconds when it sent one."""

    retry_safe = True


class ServerError(ApiError):
    """5xx answered by the server: the request was not processed, so retrying is safe."""

    retry_safe = True


class MalformedResponse(ApiError):
    """A 2xx whose body is not what the contract promises (not JSON, missing id or status)."""


class TransportError(ApiError):
    """No HTTP answer was received."""


class NotSent(TransportError):
    """The request never reached the server (connection refused, DNS, connect timeout)."""

    retry_safe = True


class SlotMissed(NotSent):
    """Ready to send too late for the rate-limit slot (a slow step between the slot and the
    write, such as the create's sent-mark): nothing was sent. Not a failure of the call: the
    caller retries at once, with a fresh slot, without counting an attempt."""


class Ambiguous(TransportError):
    """The request was sent but no answer came back (read timeout, dropped connection).

    Whether it took effect is unknown: a create that ends like this is not re-posted blindly.
    """


class SlotTooFar(PaypollError):
    """The limiter's next free slot for an account is further than the caller may wait.

    ``retry_in`` seconds from now is when to come back (an actor reschedules its job for then
    instead of holding a worker thread). When ``hold`` is set, a slot was booked for the caller
    and held: ``hold`` is its time on the Redis clock, to be handed back to the limiter (the
    client's ``hold=``) when the job comes back, which then costs no second reservation. When it
    is None nothing was booked.
    """

    def __init__(self, account: str, retry_in: float, hold: float | None = None) -> None:
        self.account = account
        self.retry_in = retry_in
        self.hold = hold
        held = ", held for the caller" if hold is not None else ""
        super().__init__(f"next slot for account={account} is {retry_in:.3f}s away{held}")


class WaitTimeout(PaypollError):
    """``wait_for`` gave up: the payment did not reach any of the awaited states in time.

    Nothing is wrong with the payment itself: the workers keep creating and tracking it.
    """

    def __init__(
        self,
        *,
        account: str,
        reference_id: str,
        states: tuple[str, ...],
        last_state: str,
        timeout: float,
    ) -> None:
        self.account = account
        self.reference_id = reference_id
        self.states = states
        self.last_state = last_state
        self.timeout = timeout
        super().__init__(
            f"payment {reference_id!r} of account {account!r} reached none of "
            f"{', '.join(states)} within {timeout:g}s; it is {last_state!r}"
        )


class ReplicationLag(PaypollError):
    """Under Sentinel, what a producer recorded did not reach a replica in time (WAIT): a
    failover now could lose it. Submitting again is harmless (submits are idempotent)."""

    def __init__(self, acked: int, wanted: int) -> None:
        self.acked = acked
        self.wanted = wanted
        super().__init__(
            f"recorded on the Redis master but acknowledged by {acked} of {wanted} replica(s) "
            "in time (PAYPOLL_REDIS_WAIT_TIMEOUT): submit again to be sure it is kept"
        )
