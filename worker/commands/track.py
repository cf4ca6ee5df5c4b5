"""`paypoll track`: track a payment request created elsewhere."""

from __future__ import annotations

import argparse

from worker.commands.common import print_json, run_or_report, settings_or_exit

HELP = "track a payment request created elsewhere until it is terminal"
DESCRIPTION = (
    "Record a payment request that was created outside paypoll (by its API id) so that the "
    "workers poll it until paid, expired or cancelled. Prints its reference_id."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("payment_id", metavar="PAYMENT_ID", help="the API's payment request id")
    parser.add_argument("--account", required=True, help="account alias the payment belongs to")
    parser.add_argument("--reference-id", help="your reference for it (default: track-PAYMENT_ID)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from worker.producer import Producer

    settings = settings_or_exit()
    producer = run_or_report(lambda: Producer.from_settings(settings))
    ref = run_or_report(
        lambda: producer.track_payment(
            account=args.account, payment_id=args.payment_id, reference_id=args.reference_id
        )
    )
    if args.json:
        print_json({"account": args.account, "reference_id": ref, "payment_id": args.payment_id})
    else:
        print(ref)
    return 0
