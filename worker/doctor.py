"""What `paypoll doctor` checks: the things operators get wrong, each with how to fix it.

Every check returns one :class:`Finding` (``ok``, ``warn``, ``fail``, or ``skip`` when an earlier
failure makes it meaningless) with a message saying what was seen and, when not ok, a fix. The
checks read; the only thing they send anywhere is one token call per account, through the
rate limiter like every other call (so a running fleet's limit holds). No finding carries a
secret: accounts are named by their alias, the Redis URL's password is masked.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis
import requests

from worker.api.client import ApiClient
from worker.collectors import broker_queue_reader, read_store
from worker.connection import connect_redis
from worker.demo.redis_provider import redact_url
from worker.errors import ApiError, CredentialsRefused, PaypollError, SlotTooFar
from worker.settings import Settings, env_name

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
# Redis 5 brought streams (the events stream, XADD) and scripts replicated by their effects
# (the Lua scripts read TIME before they write).
MIN_REDIS = (5, 0)
# Redis clock against this host's: every schedule is on the Redis clock, but logs, the API's
# timestamps and an operator's reading of them are on the hosts'. NTP keeps both within ms.
CLOCK_WARN_SECONDS = 1.0
# A step this late means no fleet dispatches it (the PaypollStepsOverdue alert's threshold).
OVERDUE_FAIL_SECONDS = 120.0
# Longest wait for a token call's rate-limit slot: a running fleet may be using the key's whole
# rate, and the slot is held for us at most PAYPOLL_MAX_AHEAD ahead.
TOKEN_MAX_WAIT = 10.0
# Seconds to wait for Redis (connect, each reply) and for a metrics endpoint's answer.
TIMEOUT = 3.0


@dataclass(frozen=True)
class Finding:
    """The outcome of one check: what was seen and, unless it is ok, how to fix it."""

    check: str
    status: str
    message: str
    fix: str = ""

    def line(self) -> str:
        """One line for the terminal: ``STATUS check: message; fix``."""
        text = f"{self.status.upper():<4}  {self.check}: {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix else text

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def check_redis(client: redis.Redis, url: str) -> tuple[Finding, dict[str, Any] | None]:
    """Redis answers and is recent enough; also returns its INFO (None when unreachable)."""
    where = redact_url(url)
    try:
        info: dict[str, Any] = client.info()
    except redis.RedisError as exc:
        # redis-py's messages name host and port, never the URL's password.
        return (
            Finding(
                "redis",
                FAIL,
                f"{where} does not answer ({type(exc).__name__}: {exc})",
                f"start Redis there, or set {env_name('redis_url')} to the one paypoll uses",
            ),
            None,
        )
    version = str(info.get("redis_version", "?"))
    if _version(version) < MIN_REDIS:
        minimum = ".".join(map(str, MIN_REDIS))
        fix = f"upgrade Redis to {minimum} or newer (7.x recommended)"
        return Finding("redis", FAIL, f"{where} is Redis {version}", fix), info
    return Finding("redis", OK, f"{where} answers, Redis {version}"), info


def check_cluster(client: Any) -> Finding:
    """On Redis Cluster: every slot served, the state ok, and what each master runs with (the
    other checks read one node's INFO; a node without AOF loses its slots' payments)."""
    slots = client.cluster_slots()  # {(start, end): {"primary": (host, port), ...}}
    served = sum(end - start + 1 for start, end in slots)
    state = client.cluster_info().get("cluster_state", "?")
    infos = client.info(target_nodes=client.get_primaries())
    no_aof = sorted(name for name, info in infos.items() if not info.get("aof_enabled"))
    message = (
        f"{len(infos)} masters, {served} of 16384 slots served, cluster_state {state}; "
        f"AOF on {len(infos) - len(no_aof)} of {len(infos)}"
    )
    if state != "ok" or served < 16384:
        return Finding(
            "cluster", FAIL, message, "fix the cluster (redis-cli --cluster check / fix)"
        )
    if no_aof:
        return Finding("cluster", WARN, message, f"turn AOF on for {', '.join(no_aof)}")
    return Finding("cluster", OK, message)


def check_persistence(info: dict[str, Any]) -> Finding:
    """AOF on: without it a Redis restart loses every payment since the last snapshot."""
    if int(info.get("aof_enabled", 0)) == 1:
        return Finding("persistence", OK, "AOF is on (appendonly yes)")
    return Finding(
        "persistence",
        WARN,
        "AOF is off (appendonly no): a Redis restart loses what changed since the last snapshot",
        "set `appendonly yes` in redis.conf (live: CONFIG SET appendonly yes, then CONFIG REWRITE)",
    )


def check_eviction(info: dict[str, Any]) -> Finding:
    """``maxmemory-policy noeviction``: an evicted key is a forgotten payment."""
    policy = str(info.get("maxmemory_policy", "?"))
    limit = int(info.get("maxmemory", 0))
    if policy == "noeviction":
        return Finding("maxmemory-policy", OK, "noeviction: a full Redis refuses writes")
    fix = "set `maxmemory-policy noeviction` (CONFIG SET maxmemory-policy noeviction)"
    if limit == 0:
        message = f"{policy}, no maxmemory set yet: the day one is set, keys may be evicted"
        return Finding("maxmemory-policy", WARN, message, fix)
    message = f"{policy} with maxmemory {limit} bytes: Redis may evict payments when full"
    return Finding("maxmemory-policy", FAIL, message, fix)


def check_clock(client: redis.Redis) -> Finding:
    """The Redis clock against this host's, to within the round trip."""
    before = time.time()
    seconds, micros = client.time()
    after = time.time()
    offset = int(seconds) + int(micros) / 1e6 - (before + after) / 2
    rtt = after - before
    message = f"Redis is {offset:+.3f} s from this host (round trip {rtt * 1000:.1f} ms)"
    if abs(offset) - rtt / 2 > CLOCK_WARN_SECONDS:
        fix = "run NTP (chrony, systemd-timesyncd) on this host and on Redis's"
        return Finding("clock", WARN, message, fix)
    return Finding("clock", OK, message)


def check_accounts(settings: Settings, client: ApiClient) -> Iterator[Finding]:
    """One token call per configured account; a refused one is named by its alias."""
    if not settings.accounts:
        fix = (
            f"set {env_name('client_id')} and {env_name('client_secret')}, "
            f"or {env_name('accounts_file')}"
        )
        yield Finding("accounts", FAIL, "no account configured", fix)
        return
    for name in sorted(settings.accounts):
        check = f"account {name}"
        try:
            expires_in = client.check_credentials(name, max_wait=TOKEN_MAX_WAIT)
        except CredentialsRefused:
            where = (
                f"{env_name('client_id')}/{env_name('client_secret')}"
                if name == "default"
                else f"client_id/client_secret of [accounts.{name}] in the accounts file"
            )
            fix = f"correct {where}, or renew the API key with the provider"
            yield Finding(check, FAIL, "credentials refused by the token endpoint (403)", fix)
        except SlotTooFar as exc:
            message = f"its key is busy: no rate-limit slot within {TOKEN_MAX_WAIT:g} s"
            yield Finding(check, WARN, message, f"run doctor again in {exc.retry_in:.0f} s")
        except ApiError as exc:
            fix = f"check {env_name('api_url')} ({settings.api_url}) and the network"
            yield Finding(check, FAIL, f"token call failed: {exc.outcome} ({exc.message})", fix)
        else:
            yield Finding(check, OK, f"token issued (valid {expires_in:g} s)")


def _serves_paypoll(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host  # a wildcard bind: ask over loopback
    try:
        answer = requests.get(f"http://{target}:{port}/metrics", timeout=TIMEOUT)
    except requests.RequestException:
        return False
    return answer.ok and "paypoll_" in answer.text


def check_metrics_port(host: str, port: int) -> Finding:
    """The metrics address is free for a fleet on this host (or a paypoll fleet serves it)."""
    where = f"{host}:{port}"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the exporter binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            in_use = exc.errno == errno.EADDRINUSE
            if in_use and _serves_paypoll(host, port):
                message = f"{where} is served by a running paypoll fleet"
                fix = f"a second fleet on this host needs another {env_name('metrics_port')}"
                return Finding("metrics-port", OK, f"{message} ({fix})")
            reason = "in use by another program" if in_use else (exc.strerror or str(exc))
            fix = f"set {env_name('metrics_port')} (or {env_name('metrics_host')}) to a free one"
            return Finding("metrics-port", WARN, f"{where} {reason}", fix)
    return Finding("metrics-port", OK, f"{where} is free")


def check_queues(client: redis.Redis, settings: Settings) -> Finding:
    """Queue depths and the oldest due step: steps long overdue mean no fleet dispatches."""
    from worker.actors import QUEUES

    keys = settings.keys()
    reader = broker_queue_reader(settings.broker_url, settings.namespace, timeout=TIMEOUT)
    snap = read_store(
        client, keys, settings.namespace, () if reader else QUEUES, accounts=settings.accounts
    )
    if reader is not None:
        snap = replace(snap, queues=reader(QUEUES))
    ready = {queue: depth.ready for queue, depth in snap.queues.items()}
    scheduled = sum(step.scheduled for step in snap.steps.values())
    overdue = sum(step.overdue for step in snap.steps.values())
    late = max((step.overdue_seconds for step in snap.steps.values()), default=0.0)
    depths = ", ".join(f"{queue} {count}" for queue, count in ready.items())
    message = (
        f"ready {depths}; steps scheduled {scheduled}, overdue {overdue}, "
        f"oldest due step {late:.1f} s late; workers alive {snap.workers_alive}"
    )
    if late > OVERDUE_FAIL_SECONDS:
        fix = (
            "start `paypoll worker` against this Redis, prefix and namespace"
            if snap.workers_alive == 0
            else "the fleet cannot keep up: add workers, or check its logs for errors"
        )
        return Finding("queues", FAIL, message, fix)
    return Finding("queues", OK, message)


def check_broker(settings: Settings) -> Finding:
    """The job queues' broker answers: RabbitMQ (login, vhost, version, the queue type
    paypoll declares there) or the Redis of ``PAYPOLL_BROKER_URL``; without one, the jobs are
    on the store's Redis (checked above)."""
    problem = settings.jobs_broker_problem()
    if problem:
        return Finding("broker", FAIL, problem, "set it to the RabbitMQ the fleets use")
    if not settings.broker_url:
        return Finding("broker", OK, f"the job queues are on {redact_url(settings.redis_url)}")
    where = redact_url(settings.broker_url)
    fix = f"start it there, or set {env_name('broker_url')} to the broker the fleets use"
    if not settings.uses_rabbitmq():
        client = connect_redis(settings.broker_url, socket_timeout=TIMEOUT, connect_timeout=TIMEOUT)
        try:
            client.ping()
        except redis.RedisError as exc:
            return Finding("broker", FAIL, f"{where} does not answer ({type(exc).__name__})", fix)
        finally:
            client.close()
        return Finding("broker", OK, f"the job queues are on {where}")
    from worker.rabbitmq import BrokerUnavailable, probe, quorum_offered

    try:
        version = probe(settings.broker_url, timeout=TIMEOUT)
    except BrokerUnavailable as exc:
        return Finding("broker", FAIL, str(exc), fix)
    text = ".".join(map(str, version))
    if quorum_offered(version, "paypoll-create"):
        return Finding("broker", OK, f"RabbitMQ {text} at {where}: durable quorum queues")
    return Finding(
        "broker",
        WARN,
        f"RabbitMQ {text} at {where}: durable classic queues (quorum queues need 3.8)",
        "upgrade RabbitMQ to get replicated (quorum) queues",
    )


def run_checks(settings: Settings, *, redis_client: redis.Redis | None = None) -> list[Finding]:
    """Every check, in order; Redis-dependent ones are skipped when Redis does not answer."""
    client = redis_client or connect_redis(
        settings.redis_url, socket_timeout=TIMEOUT, connect_timeout=TIMEOUT
    )
    reached, info = check_redis(client, settings.redis_url)
    findings = [reached]
    if info is None:
        skipped = ("persistence", "maxmemory-policy", "clock", "accounts", "queues")
        findings += [Finding(name, SKIP, "Redis does not answer") for name in skipped]
    else:
        findings += [check_persistence(info), check_eviction(info), check_clock(client)]
        if settings.redis_is_cluster:
            try:
                findings.append(check_cluster(client))
            except redis.RedisError as exc:
                findings.append(Finding("cluster", FAIL, f"cannot read the cluster: {exc}", ""))
        try:
            from worker.runtime import Runtime

            runtime = Runtime.build(settings, redis_client=client)
            findings += list(check_accounts(settings, runtime.client))
        except (redis.RedisError, PaypollError) as exc:
            findings.append(Finding("redis", FAIL, f"failed during the checks: {exc}", ""))
    if info is None and not settings.broker_url:
        broker = Finding("broker", SKIP, "the job queues are on Redis, which does not answer")
    else:
        broker = check_broker(settings)
    findings.append(broker)
    if info is not None:
        if broker.status == FAIL:
            findings.append(Finding("queues", SKIP, "the broker does not answer"))
        else:
            try:
                findings.append(check_queues(client, settings))
            except (redis.RedisError, PaypollError) as exc:
                findings.append(Finding("queues", FAIL, f"cannot read the queues: {exc}", ""))
    findings.append(check_metrics_port(settings.metrics_host, settings.metrics_port))
    return findings


def exit_status(findings: list[Finding]) -> int:
    """0 when every check is ok (or skipped for no fault of its own), else 1."""
    return 0 if all(f.status in (OK, SKIP) for f in findings) else 1
