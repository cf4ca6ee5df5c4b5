"""`paypoll worker`: run the worker fleet on this host."""

from __future__ import annotations

import argparse
import os
import sys

from worker.commands.common import settings_or_exit
from worker.errors import ConfigError
from worker.settings import Settings, env_name

HELP = "run the worker fleet on this host (create, track, sweep, serve metrics)"
DESCRIPTION = (
    "Run N dramatiq worker processes with M threads each on paypoll's queues, the sweeper "
    "(one per fleet at a time), and the metrics endpoint (PAYPOLL_METRICS_HOST:"
    "PAYPOLL_METRICS_PORT). SIGTERM or Ctrl-C stops it gracefully. Start as many fleets on as "
    "many hosts as you like against one Redis."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processes", type=int, default=os.cpu_count() or 1, help="worker processes"
    )
    parser.add_argument("--threads", type=int, default=16, help="threads per worker process")
    parser.add_argument(
        "--no-metrics", action="store_true", help="do not serve the metrics endpoint"
    )


def run(args: argparse.Namespace) -> int:
    from worker.fleet import Fleet
    from worker.logs import configure_logging

    if args.processes < 1 or args.threads < 1:
        print("paypoll worker: --processes and --threads must be at least 1", file=sys.stderr)
        return 2
    settings = settings_or_exit()
    if not settings.accounts:
        print(
            "paypoll worker: no account configured: set PAYPOLL_CLIENT_ID and "
            "PAYPOLL_CLIENT_SECRET, or PAYPOLL_ACCOUNTS_FILE",
            file=sys.stderr,
        )
        return 2
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    refused = _broker_refuses(settings)
    if refused:
        print(f"paypoll worker: {refused}", file=sys.stderr)
        return 2
    fleet = Fleet(
        settings=settings,
        processes=args.processes,
        threads=args.threads,
        serve_metrics=not args.no_metrics,
    )
    try:
        return fleet.run()
    except ConfigError as exc:
        print(f"paypoll worker: {exc}", file=sys.stderr)
        return 2


def _broker_refuses(settings: Settings) -> str:
    """Why RabbitMQ refuses this fleet (login, vhost), or "" when it lets it in. A broker
    that does not answer yet is no reason to refuse: the workers retry (it may be starting
    with them), as they do with Redis. On Redis Cluster a broker is required."""
    if settings.jobs_broker_problem():
        return settings.jobs_broker_problem()
    if not settings.uses_rabbitmq():
        return ""
    import structlog

    from worker.rabbitmq import BrokerUnavailable, probe

    try:
        probe(settings.broker_url, timeout=5.0)
    except BrokerUnavailable as exc:
        if exc.refused:
            return f"{env_name('broker_url')}: {exc}"
        structlog.get_logger("paypoll.broker").warning("broker.unreachable", error=str(exc))
    return ""
