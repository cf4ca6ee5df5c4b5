"""`paypoll events`: the payment transitions of the events stream, and who consumes it."""

from __future__ import annotations

import argparse
import re
import signal
import threading
import time
from types import FrameType

from worker.commands.common import print_json, run_or_report, settings_or_exit
from worker.errors import ValidationError
from worker.events import Event, check_entry_id, group_lags, recent_events, tail_events

HELP = "show payment transitions (--follow to keep reading) and consumer groups' lag"
DESCRIPTION = (
    "Print the last transitions of the events stream, oldest first, or those after --since; "
    "with --follow keep printing new ones until interrupted. Read-only: consumes nothing. "
    "--groups shows each consumer group's lag and pending events instead."
)
_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_LAST = 20


def since_id(value: str, now: float) -> str:
    """The entry id to read after, from an event id or an age such as ``15m`` (before
    ``now``, epoch seconds); ValidationError naming --since otherwise."""
    match = _AGO.match(value)
    if match:
        ms = int((now - float(match.group(1)) * _UNIT[match.group(2)]) * 1000)
        return f"{max(ms, 0)}-0"
    try:
        return check_entry_id(value, "--since")
    except ValidationError:
        raise ValidationError(
            "--since",
            f"expected an event id (1700000000000-0) or an age (90s, 15m, 2h), not {value!r}",
        ) from None


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of events >= 0, not {value!r}")
    return int(value)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--account", action="append", help="only this account (repeatable)")
    parser.add_argument("--since", help="events after this event id, or this long ago (15m)")
    parser.add_argument(
        "--last",
        type=_count,
        default=None,
        help=f"how many past events to print (default: {DEFAULT_LAST}; with --since: all)",
    )
    parser.add_argument("--groups", action="store_true", help="show consumer groups' lag")


def _line(event: Event) -> str:
    when = time.strftime("%H:%M:%S", time.gmtime(event.at)) + f".{int(event.at % 1 * 1000):03d}Z"
    extra = f"  payment_id={event.payment_id}" if event.payment_id else ""
    if event.error:
        extra += f"  error={event.error[:120]}"
    return (
        f"{event.id}  {when}  {event.account}/{event.reference_id}  "
        f"{event.previous} -> {event.state}{extra}"
    )


def _print(event: Event, as_json: bool) -> None:
    if as_json:
        print_json(event.to_json())
    else:
        print(_line(event), flush=True)


def run(args: argparse.Namespace) -> int:
    from worker.connection import connect_redis

    settings = settings_or_exit()
    client = connect_redis(settings.redis_url)
    keys = settings.keys()
    if args.groups:
        lags = run_or_report(lambda: group_lags(client, keys))
        if args.json:
            for lag in lags:
                print_json(lag.__dict__)
        elif not lags:
            print("no consumer group reads the events stream")
        else:
            print(f"{'group':<24} {'consumers':>9} {'pending':>8} {'lag':>8}  last delivered")
            for lag in lags:
                shown = "?" if lag.lag is None else str(lag.lag)
                print(
                    f"{lag.group:<24} {lag.consumers:>9} {lag.pending:>8} {shown:>8}  "
                    f"{lag.last_delivered}"
                )
        return 0
    since = run_or_report(lambda: since_id(args.since, time.time())) if args.since else None
    last = args.last if args.last is not None else (None if since else DEFAULT_LAST)
    past = run_or_report(
        lambda: recent_events(client, keys, since=since, last=last, accounts=args.account)
    )
    for event in past:
        _print(event, args.json)
    if not args.follow:
        return 0
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    after = past[-1].id if past else (since or "$")

    def follow() -> None:
        for event in tail_events(client, keys, after=after, accounts=args.account, stop=stop):
            _print(event, args.json)

    run_or_report(follow)
    return 0
