"""The sandbox's configuration: one typed object, built once by the CLI (or a test)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from worker.sandbox.faults import FaultSettings
from worker.sandbox.notation import check_share

LIMIT_MODES = ("sliding", "fixed", "bucket")
RETRY_AFTER_FORMATS = ("seconds", "date", "none")

# Defaults of the sandbox, each a named constant.
HOST = "127.0.0.1"  # loopback: the sandbox has unauthenticated admin routes
PORT = 8080
DEFAULT_CLIENT = ("sandbox-client", "sandbox-secret")  # used when no --client is given
RATE = 5.0  # requests per second per API key (api-contract.md)
TOKEN_TTL = 3600.0  # seconds; the API's documented expires_in
PAY_AFTER = (1.0, 5.0)  # seconds from creation to the drawn outcome
NO_TAIL = (0.0, 0.0, 0.0)  # (share, min, max) of --pay-after-tail: no payer in a tail
OUTCOME_WEIGHTS = {"paid": 0.8, "expired": 0.1, "cancelled": 0.1}
EXPIRE_AFTER = 600.0  # seconds a "stay pending" payment waits before it expires
UNKNOWN_STATUS_NAME = "processing"  # an undocumented status, for tolerance tests
MAX_AMOUNT = 1_000_000  # larger amounts are refused with 422 (well-formed but refused)

#: API keys the sandbox accepts, "ID:SECRET" separated by spaces or commas: unlike --client,
#: an environment is not shown to other users by `ps`.
CLIENTS_ENV = "PAYPOLL_SANDBOX_CLIENTS"


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Everything the sandbox is started with. Fault settings may later change at run time."""

    host: str = HOST
    port: int = PORT
    clients: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {DEFAULT_CLIENT[0]: DEFAULT_CLIENT[1]}
    )
    rate: float = RATE
    limit_mode: str = "sliding"
    retry_after: str = "seconds"
    token_ttl: float = TOKEN_TTL
    seed: int = 0
    pay_after: tuple[float, float] = PAY_AFTER
    pay_after_tail: tuple[float, float, float] = NO_TAIL
    outcomes: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(OUTCOME_WEIGHTS))
    stay_pending: float = 0.0
    expire_after: float = EXPIRE_AFTER
    unknown_status: float = 0.0
    unknown_status_name: str = UNKNOWN_STATUS_NAME
    max_amount: float = MAX_AMOUNT
    faults: FaultSettings = dataclasses.field(default_factory=FaultSettings)
    log_requests: bool = False

    def __post_init__(self) -> None:
        if self.limit_mode not in LIMIT_MODES:
            raise ValueError(f"limit mode must be one of {LIMIT_MODES}")
        if self.retry_after not in RETRY_AFTER_FORMATS:
            raise ValueError(f"retry-after format must be one of {RETRY_AFTER_FORMATS}")
        if not self.rate > 0:
            raise ValueError("rate must be > 0")
        if self.limit_mode != "bucket" and math.floor(self.rate) < 1:
            raise ValueError("sliding and fixed modes need a rate of at least 1")
        if not self.token_ttl > 0:
            raise ValueError("token ttl must be > 0")
        if not self.clients:
            raise ValueError("at least one client is needed")
        for share in (self.stay_pending, self.unknown_status, self.pay_after_tail[0]):
            check_share(share)
        if not 0 <= self.pay_after_tail[1] <= self.pay_after_tail[2]:
            raise ValueError("pay-after-tail needs 0 <= MIN <= MAX")
        if self.expire_after < 0:
            raise ValueError("expire-after must be >= 0")

    def public(self) -> dict[str, object]:
        """The configuration as JSON-able data, without client secrets."""
        return {
            "clients": sorted(self.clients),
            "rate": self.rate,
            "limit_mode": self.limit_mode,
            "retry_after": self.retry_after,
            "token_ttl": self.token_ttl,
            "seed": self.seed,
            "pay_after": list(self.pay_after),
            "pay_after_tail": list(self.pay_after_tail),
            "outcomes": dict(self.outcomes),
            "stay_pending": self.stay_pending,
            "expire_after": self.expire_after,
            "unknown_status": self.unknown_status,
            "unknown_status_name": self.unknown_status_name,
            "max_amount": self.max_amount,
        }
