"""Which webhook endpoints exist, and which events each one gets.

The global endpoint (``PAYPOLL_WEBHOOK_URL``) is named ``global``; an account with its own
``webhook_url`` in the accounts file has an endpoint named ``account/<alias>``, which gets that
account's events instead of the global one. Names, never URLs, appear in keys, metrics and
logs: a URL may carry a token in its query string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.settings import Secret, Settings
from worker.store import State
from worker.webhooks.signing import secret_key

GLOBAL = "global"
CREATED = "created"  # the event name of a move into pending: the hosted url is known


def event_name(state: str) -> str:
    """The webhook event name of a move into ``state`` (``payment.<name>`` is its type)."""
    return CREATED if state == State.PENDING.value else state


@dataclass(frozen=True)
class Endpoint:
    """One receiver of webhooks."""

    name: str
    url: str = field(repr=False)
    secret: Secret = field(repr=False)
    events: frozenset[str]

    @property
    def key(self) -> bytes:
        """The signing key bytes of the secret."""
        return secret_key(self.secret.reveal())


@dataclass(frozen=True)
class Endpoints:
    """The configured endpoints and the routing of each account's events."""

    by_name: dict[str, Endpoint]
    by_account: dict[str, str]  # account -> endpoint name (absent: the global one, if any)

    @classmethod
    def from_settings(cls, settings: Settings) -> Endpoints:
        events = frozenset(settings.webhook_events)
        by_name: dict[str, Endpoint] = {}
        if settings.webhook_url and settings.webhook_secret is not None:
            secret = settings.webhook_secret
            by_name[GLOBAL] = Endpoint(GLOBAL, settings.webhook_url, secret, events)
        by_account = {}
        for account in settings.accounts.values():
            if account.webhook_url and account.webhook_secret is not None:
                name = f"account/{account.name}"
                by_name[name] = Endpoint(name, account.webhook_url, account.webhook_secret, events)
                by_account[account.name] = name
        return cls(by_name=by_name, by_account=by_account)

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def route(self, account: str, state: str) -> Endpoint | None:
        """The endpoint that gets the move of ``account``'s payment into ``state``, if any."""
        name = self.by_account.get(account, GLOBAL)
        endpoint = self.by_name.get(name)
        if endpoint is None or event_name(state) not in endpoint.events:
            return None
        return endpoint
