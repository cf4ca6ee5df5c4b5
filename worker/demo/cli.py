"""``paypoll demo``: the whole pipeline on this machine, with nothing configured."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HELP = "start Redis, the sandbox and workers, run a batch of payments and show it live"
DESCRIPTION = (
    "Runs paypoll end to end on this machine: a Redis (PAYPOLL_REDIS_URL, else one answering on "
    "localhost:6379 with keys under a random paypoll-demo-* prefix that are deleted at the end, "
    "else a private redis-server it starts), the sandbox API on a free port with a short payment "
    "lifecycle, a `paypoll worker` fleet and its metrics endpoint. It submits a batch over a few "
    "API keys, shows progress (states, requests/s per key against its limit, 429s) until every "
    "payment is final, prints a summary and a last line 'DEMO-SUMMARY {json}', and stops "
    "everything it started (also on Ctrl-C and SIGTERM)."
)
NO_LOCAL_ENV = "PAYPOLL_DEMO_NO_LOCAL_REDIS"  # set to 1 to skip the localhost:6379 probe


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument("--payments", type=_positive_int, default=60, help="payments to submit")
    parser.add_argument("--accounts", type=_positive_int, default=3, help="API keys (accounts)")
    parser.add_argument(
        "--rate", type=_positive_float, default=5.0, help="requests/s limit of each API key"
    )
    parser.add_argument("--processes", type=_positive_int, default=2, help="worker processes")
    parser.add_argument("--threads", type=_positive_int, default=8, help="threads per process")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="one line per update instead of the live view (automatic when stdout is no TTY)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="after the summary keep everything running (metrics to scrape) until Ctrl-C",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=180.0,
        help="seconds to wait for every payment to be final",
    )
    parser.add_argument(
        "--no-local-redis",
        action="store_true",
        help=f"do not use a Redis on localhost:6379 (also: {NO_LOCAL_ENV}=1)",
    )
    parser.add_argument(
        "--json-summary", type=Path, default=None, help="also write the summary JSON to this file"
    )
    parser.add_argument("--seed", type=int, default=None, help="sandbox seed (default: random)")


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every payment is final, 1 on error or timeout, 130 on Ctrl-C."""
    from worker.demo.orchestrator import Demo, DemoOptions
    from worker.demo.view import LiveView, PlainView

    plain = args.plain or not sys.stdout.isatty()
    options = DemoOptions(
        payments=args.payments,
        accounts=args.accounts,
        rate=args.rate,
        processes=args.processes,
        threads=args.threads,
        timeout=args.timeout,
        interval=1.0 if plain else 0.5,
        redis_url=os.environ.get("PAYPOLL_REDIS_URL") or None,
        probe_local_redis=not (args.no_local_redis or os.environ.get(NO_LOCAL_ENV) == "1"),
        keep_running=args.keep_running,
        json_summary=args.json_summary,
        seed=args.seed,
    )
    view = PlainView() if plain else LiveView()
    return Demo(options, view).run()
