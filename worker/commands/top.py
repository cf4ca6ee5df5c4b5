"""`paypoll top`: a live view of any running deployment (its Redis and its fleets' /metrics)."""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Mapping
from typing import Any

from worker.commands.common import print_json, run_or_report, settings_or_exit

# Seconds of samples rates are measured over: a call is counted when its answer is in, so a
# window of one refresh (2 s) wobbles by a call or two around a saturated key's limit.
RATE_WINDOW = 6.0
HELP = "live view of a deployment: per key req/s vs limit, 429s, payments, due steps"
DESCRIPTION = (
    "Show what a running deployment is doing, refreshed every --interval seconds: per API key "
    "the requests per second against its limit and the 429s (from the fleets' /metrics), the "
    "payments by state, the oldest due step and the detection delay's bound (from Redis). A "
    "live block on a terminal, one line per refresh otherwise; --once --json prints one JSON "
    "object for scripts (after one --interval, to measure rates). Rates are measured over the "
    f"last {RATE_WINDOW:g} s of samples (over one --interval with --once). Ctrl-C quits."
)
# The payment states shown per key in the live block (all of them are in --json).
COLUMNS = ("queued", "creating", "pending", "paid", "expired", "cancelled")
ATTENTION = ("rejected", "create_unknown", "tracking_timeout", "failed")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics",
        action="append",
        metavar="URL",
        help="a fleet's /metrics URL; repeat for each fleet (default: this host's "
        "PAYPOLL_METRICS_HOST:PAYPOLL_METRICS_PORT)",
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="one sample, then exit")
    parser.add_argument("--count", type=int, default=0, help="exit after this many refreshes")
    parser.add_argument("--json", action="store_true", help="JSON objects, one per refresh")
    parser.add_argument("--plain", action="store_true", help="one line per refresh, even on a TTY")


def default_metrics_url(host: str, port: int) -> str:
    """The local fleet's /metrics (a wildcard bind is asked over loopback)."""
    target = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{target}:{port}/metrics"


def _num(value: float | None, spec: str = "g") -> str:
    return "-" if value is None else format(value, spec)


def report_lines(report: Mapping[str, Any], where: str) -> list[str]:
    """The live block: a header, the fleet, one line per key, the detection delay."""
    queues = ", ".join(f"{q} {n}" for q, n in report["queues"].items())
    attention = ", ".join(
        f"{s} {report['payments'][s]}" for s in ATTENTION if report["payments"][s]
    )
    lines = [
        f"paypoll top  {where}  rates over {report['sample_seconds']:.1f} s  (Ctrl-C quits)",
        f"workers alive {report['workers_alive']}   queues ready: {queues}   "
        f"oldest due step {report['oldest_due_step_seconds']:.1f} s late",
        "payments  " + "  ".join(f"{s} {report['payments'][s]}" for s in COLUMNS)
        + (f"   needs attention: {attention}" if attention else ""),
        "",
        f"{'key':<16}{'req/s':>7}{'limit':>7}{'429s':>6}{'429/s':>7}"
        + "".join(f"{s:>10}" for s in COLUMNS) + f"{'due late':>10}{'bound':>9}",
    ]  # fmt: skip
    for name, acct in report["accounts"].items():
        lines.append(
            f"{name[:15]:<16}{_num(acct['requests_per_second'], '.1f'):>7}"
            f"{_num(acct['limit']):>7}{_num(acct['rate_limited_total']):>6}"
            f"{_num(acct['rate_limited_per_second'], '.1f'):>7}"
            + "".join(f"{acct['payments'][s]:>10}" for s in COLUMNS)
            + f"{acct['oldest_due_step_seconds']:>9.1f}s"
            + f"{acct['detection_delay_bound_seconds']:>8.1f}s"
        )
    observed = report["detection_delay_observed_p95_seconds"]
    lines += [
        "",
        f"detection delay bound: {report['detection_delay_bound_seconds']:.1f} s for a payment "
        "completing now (its key's latest scheduled poll) + the steps' lateness; observed p95 "
        f"{'n/a' if observed is None else f'{observed:.1f} s'}",
    ]
    failed = report["metrics"]["failed"]
    if failed:
        lines.append(
            "metrics unreachable: " + ", ".join(f"{u} ({why})" for u, why in failed.items())
        )
    return lines


def report_line(report: Mapping[str, Any]) -> str:
    """One line per refresh, for logs and pipes."""
    keys = "; ".join(
        f"{name} {_num(a['requests_per_second'], '.1f')}/{_num(a['limit'])} req/s "
        f"429s {_num(a['rate_limited_total'])}"
        for name, a in report["accounts"].items()
    )
    states = " ".join(f"{s}={n}" for s, n in report["payments"].items() if n)
    return (
        f"[{time.strftime('%H:%M:%S')}] workers={report['workers_alive']} "
        f"oldest_due={report['oldest_due_step_seconds']:.1f}s "
        f"bound={report['detection_delay_bound_seconds']:.1f}s | {states or 'no payments'} | {keys}"
    )


def run(args: argparse.Namespace) -> int:
    import redis as redis_lib

    from worker.actors import QUEUES
    from worker.collectors import broker_queue_reader
    from worker.connection import connect_redis
    from worker.demo.redis_provider import redact_url
    from worker.terminal import LiveBlock
    from worker.top import build_report, read_top_store, scrape_fleets

    if args.interval <= 0:
        print("paypoll top: --interval must be greater than 0", file=sys.stderr)
        return 2
    settings = settings_or_exit()
    client = connect_redis(settings.redis_url)
    keys = settings.keys()
    urls = args.metrics or [default_metrics_url(settings.metrics_host, settings.metrics_port)]
    limits = {name: account.rate for name, account in settings.accounts.items()}
    live = not (args.plain or args.json or args.once) and sys.stdout.isatty()
    block = LiveBlock(sys.stdout) if live else None
    where = f"{redact_url(settings.redis_url)} prefix {settings.key_prefix}"

    queue_reader = broker_queue_reader(settings.broker_url, settings.namespace, timeout=3.0)

    def read() -> Any:
        return read_top_store(
            client, keys, settings.namespace, QUEUES, settings.accounts, queue_reader
        )

    history = collections.deque([scrape_fleets(urls)])
    shown = 0
    try:
        while True:
            time.sleep(args.interval)
            now = scrape_fleets(urls)
            while len(history) > 1 and now.at - history[1].at >= RATE_WINDOW:
                history.popleft()  # keep the newest sample at least RATE_WINDOW old
            store = run_or_report(read)
            report = build_report(store, history[0], now, limits=limits)
            history.append(now)
            if args.json:
                print_json(report)
            elif block is not None:
                block.draw(report_lines(report, where))
            else:
                print(report_line(report), flush=True)
            shown += 1
            if args.once or (args.count and shown >= args.count):
                return 0
    except KeyboardInterrupt:
        return 0
    except redis_lib.RedisError as exc:  # run_or_report covers reads; this is the last guard
        print(f"paypoll top: Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if block is not None:
            block.leave()
        client.close()
