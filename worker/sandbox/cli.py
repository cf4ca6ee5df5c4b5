"""``paypoll sandbox``: run the local emulator of the Alternative Payments API."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TypeVar

from worker.sandbox import config as cfg
from worker.sandbox.config import SandboxConfig
from worker.sandbox.faults import ERROR_STATUSES, FaultSettings
from worker.sandbox.notation import (
    parse_client,
    parse_outcomes,
    parse_per_endpoint,
    parse_range,
    parse_share,
    parse_tail,
)
from worker.sandbox.server import make_server

HELP = "run a local emulator of the Alternative Payments API (for development and tests)"
DESCRIPTION = (
    "A faithful local emulator of the Alternative Payments API: OAuth client_credentials, "
    "payment requests on both documented paths, a per-API-key rate limit (sliding, fixed or "
    "bucket), a seeded payment lifecycle, fault injection, and admin routes "
    "(GET /_admin/stats, POST /_admin/faults, POST /_admin/reset, POST /_admin/payments/ID, "
    "POST /_admin/seed). "
    "Prints one line 'sandbox listening on http://HOST:PORT' to stdout once it accepts "
    "connections. Fault shares take one value for every endpoint or "
    "'token=S,create=S,get=S'."
)

T = TypeVar("T")


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Wrap a notation parser so argparse reports its ValueError as a usage error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


def _client_arg(text: str) -> tuple[str, str]:
    try:
        return parse_client(text)
    except ValueError as exc:
        # Never echo the argument: it holds a secret.
        raise argparse.ArgumentTypeError(str(exc)) from None


def clients_from_env(text: str) -> dict[str, str]:
    """The ``ID:SECRET`` entries of ``PAYPOLL_SANDBOX_CLIENTS``; ValueError naming the
    variable and the entry's position, never its text (it holds a secret)."""
    clients: dict[str, str] = {}
    for position, entry in enumerate(text.replace(",", " ").split(), start=1):
        try:
            client_id, secret = parse_client(entry)
        except ValueError as exc:
            raise ValueError(f"{cfg.CLIENTS_ENV}: entry {position}: {exc}") from None
        clients[client_id] = secret
    return clients


def _statuses(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox's options to ``parser``."""
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=cfg.HOST, help="address to bind")
    net.add_argument("--port", type=int, default=cfg.PORT, help="port to bind; 0 picks a free one")
    net.add_argument(
        "--log-requests", action="store_true", help="log each request to stderr (off: silent)"
    )
    net.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when the parent process dies (tests use it so no sandbox is orphaned)",
    )
    api = parser.add_argument_group("API keys, tokens and rate limit")
    api.add_argument(
        "--client",
        action="append",
        type=_client_arg,
        metavar="ID:SECRET",
        help="an API key the sandbox accepts (repeatable). The secret shows in `ps`: prefer "
        f"{cfg.CLIENTS_ENV}='ID:SECRET ID:SECRET' (also read). Default "
        f"{cfg.DEFAULT_CLIENT[0]}:{cfg.DEFAULT_CLIENT[1]} when none is given either way",
    )
    api.add_argument("--rate", type=float, default=cfg.RATE, help="requests per second per API key")
    api.add_argument(
        "--limit-mode",
        choices=cfg.LIMIT_MODES,
        default="sliding",
        help="sliding: at most RATE accepted requests in any window (t-1s, t]; fixed: per "
        "calendar second; bucket: token bucket of RATE, refilled at RATE/s. Refused (429) "
        "requests never count",
    )
    api.add_argument(
        "--retry-after",
        choices=cfg.RETRY_AFTER_FORMATS,
        default="seconds",
        help="Retry-After of a 429: integer seconds (ceiling, >= 1), an HTTP date, or none",
    )
    api.add_argument(
        "--token-ttl",
        type=float,
        default=cfg.TOKEN_TTL,
        help="seconds an access token is valid (fractions allowed)",
    )
    api.add_argument(
        "--seed", type=int, default=0, help="seed of every random draw (lifecycle, faults)"
    )
    api.add_argument(
        "--max-amount",
        type=float,
        default=cfg.MAX_AMOUNT,
        help="a create with a larger amount is refused with 422",
    )
    life = parser.add_argument_group("payment lifecycle (drawn at creation, from --seed)")
    life.add_argument(
        "--pay-after",
        type=_arg(parse_range),
        default=f"{cfg.PAY_AFTER[0]:g}:{cfg.PAY_AFTER[1]:g}",
        metavar="MIN:MAX",
        help="seconds from creation until the payment reaches its outcome",
    )
    life.add_argument(
        "--pay-after-tail",
        type=_arg(parse_tail),
        default="0:0:0",
        metavar="SHARE:MIN:MAX",
        help="a long tail: this SHARE of the payers (those not --stay-pending) reach their "
        "outcome uniformly MIN..MAX s after creation instead of --pay-after",
    )
    life.add_argument(
        "--outcomes",
        type=_arg(parse_outcomes),
        default=",".join(f"{k}={v:g}" for k, v in cfg.OUTCOME_WEIGHTS.items()),
        metavar="paid=W,expired=W,cancelled=W",
        help="weights of the outcomes (normalised)",
    )
    life.add_argument(
        "--stay-pending",
        type=_arg(parse_share),
        default=0.0,
        metavar="SHARE",
        help="share of payments that stay pending until --expire-after, then expire",
    )
    life.add_argument(
        "--expire-after",
        type=float,
        default=cfg.EXPIRE_AFTER,
        help="seconds after which a --stay-pending payment becomes expired",
    )
    life.add_argument(
        "--unknown-status",
        type=_arg(parse_share),
        default=0.0,
        metavar="SHARE",
        help="share of payments that show an undocumented status halfway to their outcome",
    )
    life.add_argument(
        "--unknown-status-name",
        default=cfg.UNKNOWN_STATUS_NAME,
        help="the undocumented status shown",
    )
    faults = parser.add_argument_group(
        "fault injection (after rate limit and auth; changeable via POST /_admin/faults)"
    )
    faults.add_argument(
        "--latency",
        type=_arg(lambda t: parse_per_endpoint(t, parse_range, (0.0, 0.0))),
        default="0:0",
        metavar="MIN:MAX",
        help="milliseconds added to every API answer (or token=MIN:MAX,get=...)",
    )
    faults.add_argument(
        "--error-rate",
        type=_arg(lambda t: parse_per_endpoint(t, parse_share, 0.0)),
        default="0",
        metavar="SHARE",
        help="share of requests answered with a 5xx without being processed",
    )
    faults.add_argument(
        "--error-statuses",
        type=_arg(_statuses),
        default=",".join(str(s) for s in ERROR_STATUSES),
        metavar="CODES",
        help="5xx codes drawn for --error-rate, comma-separated",
    )
    faults.add_argument(
        "--error-retry-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="send this Retry-After on injected 503s (default: none)",
    )
    faults.add_argument(
        "--drop-create-rate",
        type=_arg(parse_share),
        default=0.0,
        metavar="SHARE",
        help="share of creates that ARE made but answered by closing the connection",
    )
    faults.add_argument(
        "--malformed-rate",
        type=_arg(lambda t: parse_per_endpoint(t, parse_share, 0.0)),
        default="0",
        metavar="SHARE",
        help="share of 200 answers with a malformed body (the request is processed)",
    )


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    """The SandboxConfig the parsed options describe; ValueError if they are inconsistent."""
    faults = FaultSettings(
        latency_ms=args.latency,
        error_rate=args.error_rate,
        error_statuses=tuple(args.error_statuses),
        error_retry_after=args.error_retry_after,
        drop_create_rate=args.drop_create_rate,
        malformed_rate=args.malformed_rate,
    )
    clients = dict(args.client or [])
    clients.update(clients_from_env(os.environ.get(cfg.CLIENTS_ENV, "")))
    if not clients:
        clients = {cfg.DEFAULT_CLIENT[0]: cfg.DEFAULT_CLIENT[1]}
    return SandboxConfig(
        host=args.host,
        port=args.port,
        clients=clients,
        rate=args.rate,
        limit_mode=args.limit_mode,
        retry_after=args.retry_after,
        token_ttl=args.token_ttl,
        seed=args.seed,
        pay_after=args.pay_after,
        pay_after_tail=args.pay_after_tail,
        outcomes=args.outcomes,
        stay_pending=args.stay_pending,
        expire_after=args.expire_after,
        unknown_status=args.unknown_status,
        unknown_status_name=args.unknown_status_name,
        max_amount=args.max_amount,
        faults=faults,
        log_requests=args.log_requests,
    )


def _watch_parent(on_orphaned: Callable[[], None]) -> None:
    """Call ``on_orphaned`` once the process that started us is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.25)
        on_orphaned()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


SWITCH_INTERVAL = 0.0005  # seconds (CPython's default is 0.005)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (or the parent's death with --exit-with-parent)."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"paypoll sandbox: {exc}", file=sys.stderr)
        return 2
    # One thread per keep-alive connection: with hundreds of them, a thread woken by its
    # client's bytes waits up to the GIL switch interval (5 ms) for its turn, and the arrival
    # time it stamps is late by as much. A shorter interval keeps arrival stamps honest.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        server = make_server(config)
    except OSError as exc:
        print(
            f"paypoll sandbox: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr
        )
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever to return: call it from another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.exit_with_parent:
        _watch_parent(lambda: stop(signal.SIGTERM, None))
    print(f"sandbox listening on {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m worker.sandbox``: the same options as ``paypoll sandbox``."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.sandbox",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    configure(parser)
    return run(parser.parse_args(argv))
