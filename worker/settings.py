"""One typed Settings object, built once at the entry point.

Sources, later winning: defaults (worker/defaults.py), an optional accounts file
(``PAYPOLL_ACCOUNTS_FILE``, TOML), then environment variables prefixed ``PAYPOLL_``.
A missing or malformed value raises :class:`~worker.errors.ConfigError` with one line naming the
variable (or the file and line) and what is expected. Secrets are wrapped in :class:`Secret`,
whose repr and str never show the value.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from worker import defaults
from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.keys import Keys

T = TypeVar("T")


class Secret:
    """A string that never shows itself: ``repr``/``str`` print a mask, ``reveal()`` the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself; only for building the Authorization header."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable so settings can travel to worker processes; the value stays out of reprs.
        return (Secret, (self._value,))


@dataclass(frozen=True)
class Account:
    """One API key: an alias (used in keys, logs and metrics) and its credentials."""

    name: str
    client_id: str
    client_secret: Secret = field(repr=False)
    rate: float = defaults.RATE
    webhook_url: str = ""
    """This account's own webhook endpoint (its events go there instead of the global one)."""
    webhook_secret: Secret | None = field(default=None, repr=False)


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true/false")


def _number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None


def _whole(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"expected a whole number, got {raw!r}") from None


def _parse_positive_float(raw: str) -> float:
    value = _number(raw)
    if not value > 0:
        raise ValueError("expected a number > 0")
    return value


def _parse_non_negative_float(raw: str) -> float:
    value = _number(raw)
    if value < 0:
        raise ValueError("expected a number >= 0")
    return value


def _parse_positive_int(raw: str) -> int:
    value = _whole(raw)
    if value <= 0:
        raise ValueError("expected a whole number > 0")
    return value


def _parse_shards(raw: str) -> int:
    value = _whole(raw)
    if not 1 <= value <= defaults.SWEEPER_SHARDS_MAX:
        raise ValueError(f"expected a whole number from 1 to {defaults.SWEEPER_SHARDS_MAX}")
    return value


def _parse_share(raw: str) -> float:
    value = _number(raw)
    if not 0 <= value <= 1:
        raise ValueError("expected a share between 0 and 1")
    return value


def _parse_positive_share(raw: str) -> float:
    value = _number(raw)
    if not 0 < value <= 1:
        raise ValueError("expected a share above 0 and at most 1")
    return value


POLL_POLICIES = ("planner", "backoff", "round_robin")


def _parse_poll_policy(raw: str) -> str:
    if raw not in POLL_POLICIES:
        raise ValueError("expected " + ", ".join(POLL_POLICIES))
    return raw


def _parse_port(raw: str) -> int:
    value = _whole(raw)
    if not 0 <= value <= 65535:
        raise ValueError("expected a port number 0-65535")
    return value


def _parse_redis_url(raw: str) -> str:
    from worker.connection import is_cluster, is_sentinel, parse_cluster_url, parse_sentinel_url

    if is_sentinel(raw):
        parse_sentinel_url(raw)
        return raw
    if is_cluster(raw):
        parse_cluster_url(raw)
        return raw
    if urlsplit(raw).scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(
            "expected a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"
        )
    return raw


AMQP_SCHEMES = ("amqp", "amqps")


def _parse_broker_url(raw: str) -> str:
    """An amqp:// or amqps:// URL (RabbitMQ), or a Redis URL (dramatiq's Redis broker there).
    Errors never echo the URL: it may hold a password."""
    parts = urlsplit(raw)
    if parts.scheme in AMQP_SCHEMES:
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname or port == -1:
            raise ValueError("expected amqp://user:password@host:port/vhost (amqps:// for TLS)")
        if "/" in parts.path[1:]:
            raise ValueError("expected one vhost after the host (write a / in it as %2F)")
        return raw
    if parts.scheme in {"redis+cluster", "rediss+cluster"}:
        raise ValueError(
            "expected amqp:// or amqps://: dramatiq's Redis broker cannot run on Redis Cluster"
        )
    try:
        return _parse_redis_url(raw)
    except ValueError:
        raise ValueError(
            "expected an amqp:// or amqps:// URL (RabbitMQ), or a redis://, rediss://, unix:// "
            "or redis+sentinel:// URL (empty: the jobs on PAYPOLL_REDIS_URL)"
        ) from None


def _parse_replicas(raw: str) -> str:
    if raw != "auto" and not raw.isdigit():
        raise ValueError("expected auto or a number of replicas >= 0")
    return raw


def _parse_http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("expected an absolute http:// or https:// URL")
    return raw.rstrip("/")


def _parse_path(raw: str) -> str:
    if not raw.startswith("/"):
        raise ValueError("expected a path starting with /")
    return raw.rstrip("/")


def _parse_webhook_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("expected an absolute https:// URL")
    return raw


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (plain http:// is allowed there by default)."""
    host = (urlsplit(url).hostname or "").lower()
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _parse_webhook_secret(raw: str) -> Secret:
    from worker.webhooks.signing import secret_key

    secret_key(raw)
    return Secret(raw)


WEBHOOK_EVENT_NAMES = (
    "created",  # pending on the API: the hosted url is known
    "queued",
    "creating",
    "paid",
    "expired",
    "cancelled",
    "rejected",
    "create_unknown",
    "tracking_timeout",
    "failed",
)


def _parse_webhook_events(raw: str) -> tuple[str, ...]:
    names = tuple(
        dict.fromkeys(n.strip().removeprefix("payment.") for n in raw.split(",") if n.strip())
    )
    unknown = sorted(set(names) - set(WEBHOOK_EVENT_NAMES))
    if unknown or not names:
        problem = f"unknown {', '.join(unknown)}; " if unknown else ""
        raise ValueError(
            f"{problem}expected a comma-separated list of {', '.join(WEBHOOK_EVENT_NAMES)}"
        )
    return names


def _parse_log_format(raw: str) -> str:
    if raw not in {"auto", "json", "console"}:
        raise ValueError("expected auto, json or console")
    return raw


def _parse_str(raw: str) -> str:
    if not raw:
        raise ValueError("expected a non-empty value")
    return raw


@dataclass(frozen=True)
class Settings:
    """Everything a paypoll process needs to know, read once and passed down.

    Each field maps to ``PAYPOLL_<FIELD NAME IN UPPER CASE>``; ``ENV_HELP`` documents each one.
    """

    redis_url: str = defaults.REDIS_URL
    broker_url: str = ""
    """Where the job queues live: empty for dramatiq's Redis broker on ``redis_url``."""
    redis_wait_replicas: str = "auto"
    redis_wait_timeout: float = defaults.REDIS_WAIT_TIMEOUT
    api_url: str = defaults.API_URL
    payments_path: str = defaults.PAYMENTS_PATH
    key_prefix: str = defaults.KEY_PREFIX
    namespace: str = defaults.NAMESPACE
    accounts: Mapping[str, Account] = field(default_factory=dict)
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    read_timeout: float = defaults.READ_TIMEOUT
    token_renew_before: float = defaults.TOKEN_RENEW_BEFORE
    rate_margin: float = defaults.RATE_MARGIN
    max_wait: float = defaults.MAX_WAIT
    max_ahead: float = defaults.MAX_AHEAD
    penalty_default: float = defaults.PENALTY_DEFAULT
    poll_first_delay: float = defaults.POLL_FIRST_DELAY
    poll_factor: float = defaults.POLL_FACTOR
    poll_max_delay: float = defaults.POLL_MAX_DELAY
    poll_jitter: float = defaults.POLL_JITTER
    poll_policy: str = defaults.POLL_POLICY
    poll_share: float = defaults.POLL_SHARE
    poll_floor: float = defaults.POLL_FLOOR
    poll_min_gap: float = defaults.POLL_MIN_GAP
    poll_max_gap: float = defaults.POLL_MAX_GAP
    poll_cost: float = defaults.POLL_COST
    tracking_timeout: float = defaults.TRACKING_TIMEOUT
    create_max_attempts: int = defaults.CREATE_MAX_ATTEMPTS
    retry_base_delay: float = defaults.RETRY_BASE_DELAY
    retry_max_delay: float = defaults.RETRY_MAX_DELAY
    retry_ambiguous_create: bool = defaults.RETRY_AMBIGUOUS_CREATE
    sweep_interval: float = defaults.SWEEP_INTERVAL
    sweep_grace: float = defaults.SWEEP_GRACE
    dead_after: float = defaults.DEAD_AFTER
    sweeper_shards: int = defaults.SWEEPER_SHARDS
    local_steps: bool = defaults.LOCAL_STEPS
    local_threads: int = defaults.LOCAL_THREADS
    events_maxlen: int = defaults.EVENTS_MAXLEN
    callback_actor: str = ""
    webhook_url: str = ""
    webhook_secret: Secret | None = field(default=None, repr=False)
    webhook_events: tuple[str, ...] = defaults.WEBHOOK_EVENTS
    webhook_retry_for: float = defaults.WEBHOOK_RETRY_FOR
    webhook_concurrency: int = defaults.WEBHOOK_CONCURRENCY
    webhook_connect_timeout: float = defaults.WEBHOOK_CONNECT_TIMEOUT
    webhook_read_timeout: float = defaults.WEBHOOK_READ_TIMEOUT
    webhook_allow_http: bool = False
    metrics_host: str = defaults.METRICS_HOST
    metrics_port: int = defaults.METRICS_PORT
    metrics_dir: str = ""
    log_format: str = defaults.LOG_FORMAT
    log_level: str = defaults.LOG_LEVEL

    def wait_replicas(self) -> int:
        """Replicas that must acknowledge a create's sent-mark before its POST (WAIT): by
        default 1 under Sentinel (a failover must not lose the mark), 0 otherwise."""
        if self.redis_wait_replicas == "auto":
            return 1 if self.redis_url.startswith("redis+sentinel://") else 0
        return int(self.redis_wait_replicas)

    @property
    def redis_is_cluster(self) -> bool:
        """Whether ``redis_url`` names a Redis Cluster."""
        return self.redis_url.startswith(("redis+cluster://", "rediss+cluster://"))

    def keys(self) -> Keys:
        """The key names of this deployment (its prefix; the cluster layout on a cluster)."""
        from worker.keys import Keys

        return Keys(self.key_prefix, cluster=self.redis_is_cluster)

    def jobs_url(self) -> str:
        """The URL of the broker the job queues live on (``broker_url``, else ``redis_url``)."""
        return self.broker_url or self.redis_url

    def uses_rabbitmq(self) -> bool:
        """Whether the job queues live on RabbitMQ."""
        return urlsplit(self.broker_url).scheme in AMQP_SCHEMES

    def jobs_broker_problem(self) -> str:
        """Why the job queues have no broker ("" when they have one): on Redis Cluster, without
        ``PAYPOLL_BROKER_URL`` (dramatiq's Redis broker cannot run on a cluster). Producers and
        the CLI need no broker (the sweeper dispatches), so only what runs jobs asks."""
        if self.redis_is_cluster and not self.broker_url:
            return (
                f"{env_name('broker_url')}: required with Redis Cluster (amqp://... for "
                "RabbitMQ, or a Redis outside the cluster): dramatiq's Redis broker cannot run "
                "on a cluster"
            )
        return ""

    def account(self, name: str) -> Account:
        """The configured account ``name``; raises UnknownAccount when there is none."""
        from worker.errors import UnknownAccount

        try:
            return self.accounts[name]
        except KeyError:
            raise UnknownAccount(name) from None

    def with_accounts(self, *accounts: Account) -> Settings:
        """A copy with ``accounts`` added (tests, the demo)."""
        merged = dict(self.accounts)
        merged.update({a.name: a for a in accounts})
        return replace(self, accounts=merged)


# name -> (parser, help). The README's configuration reference is written from this table.
ENV_HELP: dict[str, tuple[Callable[[str], Any], str]] = {
    "redis_url": (
        _parse_redis_url,
        "Redis for records, limiter and (without PAYPOLL_BROKER_URL) the job queues "
        "(rediss://, passwords, redis+sentinel://)",
    ),
    "broker_url": (
        _parse_broker_url,
        "Broker of the job queues: amqp(s):// for RabbitMQ (quorum queues), or a Redis URL "
        "(empty: dramatiq's Redis broker on PAYPOLL_REDIS_URL)",
    ),
    "redis_wait_replicas": (
        _parse_replicas,
        "Replicas that must ack a create's sent-mark before its POST (auto: 1 under Sentinel)",
    ),
    "redis_wait_timeout": (
        _parse_positive_float,
        "Seconds a create waits for those acks; then it is retried, nothing sent",
    ),
    "api_url": (_parse_http_url, "Base URL of the Alternative Payments API (or the sandbox)"),
    "payments_path": (_parse_path, "Path of payment requests; the FAQ spells it /payment/request"),
    "key_prefix": (_parse_str, "Prefix of every Redis key paypoll writes"),
    "namespace": (
        _parse_str,
        "dramatiq's queue namespace in Redis (on RabbitMQ, give each deployment its own vhost)",
    ),
    "connect_timeout": (_parse_positive_float, "Seconds to establish a connection to the API"),
    "read_timeout": (_parse_positive_float, "Seconds to wait for the API's answer; then ambiguous"),
    "token_renew_before": (
        _parse_non_negative_float,
        "Renew a token this many seconds before it expires",
    ),
    "rate_margin": (
        _parse_non_negative_float,
        "Seconds added to each slot interval against jitter",
    ),
    "max_wait": (
        _parse_non_negative_float,
        "Longest sleep for a rate-limit slot; later slots reschedule",
    ),
    "max_ahead": (
        _parse_non_negative_float,
        "Furthest slot booked and held for a rescheduled job (below max_wait: max_wait)",
    ),
    "penalty_default": (_parse_positive_float, "Pause of a key after a 429 without Retry-After"),
    "poll_first_delay": (
        _parse_positive_float,
        "backoff policy: seconds from create to the first poll",
    ),
    "poll_factor": (
        _parse_positive_float,
        "backoff policy: growth factor of the delay between polls",
    ),
    "poll_max_delay": (_parse_positive_float, "backoff policy: longest delay between two polls"),
    "poll_jitter": (_parse_share, "backoff policy: share of each delay drawn at random (1: full)"),
    "poll_policy": (
        _parse_poll_policy,
        "planner (polls spend the key's budget where change is likeliest), backoff or round_robin",
    ),
    "poll_share": (_parse_positive_share, "Share of a key's rate polls may use if no create waits"),
    "poll_floor": (_parse_share, "Share of a key's rate polls keep while creates wait"),
    "poll_min_gap": (_parse_positive_float, "Fewest seconds between two polls of one payment"),
    "poll_max_gap": (_parse_positive_float, "Most seconds between two polls of one payment"),
    "poll_cost": (
        _parse_non_negative_float,
        "Seconds of detection delay a poll must save (0: spend the whole poll budget)",
    ),
    "tracking_timeout": (_parse_positive_float, "Seconds after create when tracking gives up"),
    "create_max_attempts": (_parse_positive_int, "Attempts of a create on safe-to-retry failures"),
    "retry_base_delay": (_parse_positive_float, "First backoff (s) after a safe-to-retry failure"),
    "retry_max_delay": (_parse_positive_float, "Longest backoff (s) after safe-to-retry failures"),
    "retry_ambiguous_create": (_parse_bool, "Re-post creates whose answer was lost (default: no)"),
    "sweep_interval": (_parse_positive_float, "Seconds between dispatcher/sweeper passes"),
    "sweep_grace": (_parse_positive_float, "Seconds a dispatched step may take before re-dispatch"),
    "dead_after": (
        _parse_positive_float,
        "Seconds without a heartbeat before a worker's running steps are dispatched again",
    ),
    "sweeper_shards": (
        _parse_shards,
        "Sweeper leases accounts are split among by hash slot (1: one sweeper for the fleet)",
    ),
    "local_steps": (
        _parse_bool,
        "Run the steps a process's sweeper shards claim in that process (no broker message)",
    ),
    "local_threads": (
        _parse_positive_int,
        "Threads per worker process running its local steps (they never wait for a slot)",
    ),
    "events_maxlen": (_parse_positive_int, "Approximate cap of the events stream"),
    "callback_actor": (
        str,
        "[queue:]actor of your dramatiq app sent each final state, at-least-once (empty: none)",
    ),
    "webhook_url": (_parse_webhook_url, "Endpoint POSTed each chosen transition (empty: none)"),
    "webhook_secret": (_parse_webhook_secret, "whsec_ + base64 key signing webhooks"),
    "webhook_events": (
        _parse_webhook_events,
        "Transitions sent as webhooks, comma separated (created = url known)",
    ),
    "webhook_retry_for": (
        _parse_positive_float,
        "Seconds a webhook is retried before it is dead-lettered",
    ),
    "webhook_concurrency": (
        _parse_positive_int,
        "Deliveries in flight per endpoint while it answers",
    ),
    "webhook_connect_timeout": (
        _parse_positive_float,
        "Seconds to connect to a webhook endpoint",
    ),
    "webhook_read_timeout": (
        _parse_positive_float,
        "Seconds to wait for a webhook endpoint's answer",
    ),
    "webhook_allow_http": (
        _parse_bool,
        "Allow plain http:// webhook URLs beyond loopback",
    ),
    "metrics_host": (_parse_str, "Address the metrics endpoint binds"),
    "metrics_port": (_parse_port, "Port of the metrics endpoint"),
    "metrics_dir": (
        str,
        "prometheus multiprocess directory (emptied at start; default: a temp dir)",
    ),
    "log_format": (_parse_log_format, "auto, json or console"),
    "log_level": (_parse_str, "DEBUG, INFO, WARNING or ERROR"),
}


def _check_webhooks(settings: Settings) -> None:
    """The webhook settings that depend on each other: URL and secret together, plain http
    only for loopback unless allowed."""
    url, secret = settings.webhook_url, settings.webhook_secret
    if bool(url) != (secret is not None):
        missing = "webhook_secret" if url else "webhook_url"
        other = "webhook_url" if url else "webhook_secret"
        raise ConfigError(f"{env_name(missing)}: required when {env_name(other)} is set")
    endpoints = [(env_name("webhook_url"), url)] + [
        (f"accounts file: [accounts.{a.name}] webhook_url", a.webhook_url)
        for a in settings.accounts.values()
    ]
    for where, value in endpoints:
        plain = value.startswith("http://") and not is_loopback(value)
        if plain and not settings.webhook_allow_http:
            raise ConfigError(
                f"{where}: plain http:// is refused beyond loopback (the body is a payment's "
                f"outcome); use https:// or set {env_name('webhook_allow_http')}=true"
            )


_ACCOUNT_NAME = re.compile(defaults.ACCOUNT_NAME_PATTERN)
ENV_PREFIX = "PAYPOLL_"


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return ENV_PREFIX + field_name.upper()


def _check_rate(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}: rate must be a number of requests per second > 0")
    return float(value)


def _check_name(name: str, where: str) -> str:
    if not _ACCOUNT_NAME.match(name):
        raise ConfigError(
            f"{where}: account name {name!r} must match {defaults.ACCOUNT_NAME_PATTERN}"
        )
    return name


def _line_of(text: str, needle: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip().replace(" ", "") == needle:
            return number
    return None


ACCOUNT_WEBHOOK_KEYS = ("webhook_url", "webhook_secret")


def _account_webhook(table: Mapping[str, Any], where: str) -> tuple[str, Secret | None]:
    """An accounts-file table's own webhook endpoint: both keys or neither."""
    url, secret = table.get("webhook_url"), table.get("webhook_secret")
    if url is None and secret is None:
        return "", None
    for key, value in (("webhook_url", url), ("webhook_secret", secret)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: needs {key} as a non-empty string (with the other one)")
    try:
        return _parse_webhook_url(str(url)), _parse_webhook_secret(str(secret))
    except ValueError as exc:
        key = "webhook_secret" if "whsec" in str(exc) or "key" in str(exc) else "webhook_url"
        raise ConfigError(f"{where}: {key}: {exc}") from None


def load_accounts_file(path: str | Path) -> dict[str, Account]:
    """Accounts from a TOML file of ``[accounts.NAME]`` tables (see config/accounts.example.toml).

    Refuses a file that others can read (it holds secrets) and names the file and line of any
    mistake.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(
            f"{env_name('accounts_file')}={path}: cannot read the accounts file ({exc.strerror})"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the accounts file is not UTF-8 text") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: the accounts file holds secrets and is readable by others; "
            f"run: chmod 600 {path}"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    tables = data.get("accounts")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{path}: expected at least one [accounts.NAME] table")
    accounts: dict[str, Account] = {}
    for name, table in tables.items():
        line = _line_of(text, f"[accounts.{name}]")
        where = f"{path}:{line}" if line else str(path)
        _check_name(name, where)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [accounts.{name}] must be a table")
        unknown = set(table) - {"client_id", "client_secret", "rate", *ACCOUNT_WEBHOOK_KEYS}
        if unknown:
            raise ConfigError(f"{where}: [accounts.{name}] has unknown keys {sorted(unknown)}")
        for key in ("client_id", "client_secret"):
            if not isinstance(table.get(key), str) or not table[key]:
                raise ConfigError(f"{where}: [accounts.{name}] needs {key} as a non-empty string")
        rate = _check_rate(table.get("rate", defaults.RATE), f"{where}: [accounts.{name}]")
        url, secret = _account_webhook(table, f"{where}: [accounts.{name}]")
        accounts[name] = Account(
            name, table["client_id"], Secret(table["client_secret"]), rate, url, secret
        )
    return accounts


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from ``environ`` (default: ``os.environ``) and the accounts file it names."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "accounts":
            continue
        name = env_name(f.name)
        raw = env.get(name)
        if raw is None or (raw == "" and f.name != "callback_actor"):
            continue
        parser, _ = ENV_HELP[f.name]
        try:
            values[f.name] = parser(raw.strip())
        except ValueError as exc:
            reason = str(exc) if "expected" in str(exc) else f"expected {f.type}"
            raise ConfigError(f"{name}: {reason}") from None

    accounts: dict[str, Account] = {}
    accounts_file = env.get(env_name("accounts_file"))
    if accounts_file:
        accounts.update(load_accounts_file(accounts_file))
    client_id = env.get(env_name("client_id"))
    client_secret = env.get(env_name("client_secret"))
    if client_id or client_secret:
        if not client_id:
            raise ConfigError(
                f"{env_name('client_id')}: required when PAYPOLL_CLIENT_SECRET is set"
            )
        if not client_secret:
            raise ConfigError(
                f"{env_name('client_secret')}: required when PAYPOLL_CLIENT_ID is set"
            )
        rate_raw = env.get(env_name("rate"))
        try:
            rate = _parse_positive_float(rate_raw) if rate_raw else defaults.RATE
        except ValueError:
            raise ConfigError(f"{env_name('rate')}: expected a number > 0") from None
        accounts["default"] = Account("default", client_id, Secret(client_secret), rate)
    settings = Settings(accounts=accounts, **values)
    _check_webhooks(settings)
    if settings.poll_floor > settings.poll_share:
        raise ConfigError(
            f"{env_name('poll_floor')}: expected at most {env_name('poll_share')} "
            f"({settings.poll_floor:g} > {settings.poll_share:g})"
        )
    if settings.poll_max_gap < settings.poll_min_gap:
        raise ConfigError(
            f"{env_name('poll_max_gap')}: expected at least {env_name('poll_min_gap')} "
            f"({settings.poll_max_gap:g} < {settings.poll_min_gap:g})"
        )
    return settings
