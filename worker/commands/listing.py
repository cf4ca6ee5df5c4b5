"""`paypoll list`: payments, filtered by state and account."""

from __future__ import annotations

import argparse

from worker.commands.common import print_json, run_or_report, settings_or_exit
from worker.commands.status import record_json
from worker.store import State

HELP = "list payments (optionally by state and account), or counts per state"
DESCRIPTION = "List payments, one per line; with --json one JSON object per line."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", choices=[s.value for s in State], help="only this state")
    parser.add_argument("--account", help="only this account")
    parser.add_argument("--json", action="store_true", help="one JSON object per payment")
    parser.add_argument("--counts", action="store_true", help="only the number per state")


def run(args: argparse.Namespace) -> int:
    from worker.producer import Producer

    settings = settings_or_exit()
    producer = run_or_report(lambda: Producer.from_settings(settings))
    if args.counts:
        counts = run_or_report(lambda: producer.counts(account=args.account))
        if args.json:
            print_json(dict(counts))
        else:
            for state, count in counts.items():
                print(f"{state:>16}: {count}")
        return 0
    records = run_or_report(
        lambda: list(producer.list_payments(account=args.account, state=args.state))
    )
    for record in records:
        if args.json:
            print_json(record_json(record))
        else:
            print(
                f"{record.account}\t{record.reference_id}\t{record.state}\t"
                f"{record.payment_id or '-'}\tpolls={record.polls}\t{record.last_error[:80]}"
            )
    return 0
