"""`paypoll status`: one payment's record."""

from __future__ import annotations

import argparse
import time

from worker.commands.common import print_json, run_or_report, settings_or_exit
from worker.store import PaymentRecord

HELP = "show one payment: state, payment id, hosted url, polls, last error"
DESCRIPTION = "Show the record of the payment with reference id REF."

JSON_FIELDS = (
    "account",
    "reference_id",
    "payment_id",
    "state",
    "url",
    "polls",
    "attempts",
    "last_error",
    "api_status",
    "amount",
    "currency",
    "submitted_at",
    "created_at",
    "terminal_at",
    "next_at",
)


def record_json(record: PaymentRecord) -> dict[str, object]:
    """The fields `--json` prints for a payment (a stable interface: only ever add fields)."""
    data = record.to_json()
    return {name: data[name] for name in JSON_FIELDS}


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value)) + "Z"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference_id", metavar="REF", help="the payment's reference id")
    parser.add_argument("--account", help="account alias (needed if REF is in several)")
    parser.add_argument("--json", action="store_true", help="one JSON object")


def run(args: argparse.Namespace) -> int:
    from worker.producer import Producer

    settings = settings_or_exit()
    producer = run_or_report(lambda: Producer.from_settings(settings))
    record = run_or_report(lambda: producer.get_payment(args.reference_id, account=args.account))
    if args.json:
        print_json(record_json(record))
        return 0
    rows = [
        ("account", record.account),
        ("reference_id", record.reference_id),
        ("state", record.state),
        ("payment_id", record.payment_id or "-"),
        ("url", record.url or "-"),
        ("amount", f"{record.amount} {record.currency}"),
        ("api_status", record.api_status or "-"),
        ("polls", str(record.polls)),
        ("create attempts", str(record.attempts)),
        ("submitted", _when(record.submitted_at)),
        ("created", _when(record.created_at)),
        ("terminal", _when(record.terminal_at)),
        ("next step", _when(record.next_at)),
        ("last error", record.last_error or "-"),
    ]
    for name, value in rows:
        print(f"{name:>16}: {value}")
    return 0
