"""`paypoll resolve`: an operator's decision about a payment paypoll stopped on."""

from __future__ import annotations

import argparse
import sys

from worker.commands.common import print_json, run_or_report, settings_or_exit
from worker.store import State

HELP = "resolve a create_unknown, failed or tracking_timeout payment (operator action)"
DESCRIPTION = (
    "Decide about a payment paypoll will not touch on its own. For create_unknown: look the "
    "payment up with the provider (by its reference_id); if it exists, --payment-id ID tracks "
    "it; if it does not, --recreate posts it again; --give-up marks it failed. "
    "For tracking_timeout or failed: --payment-id ID (or the known one) tracks it again."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference_id", metavar="REF", help="the payment's reference id")
    parser.add_argument("--account", help="account alias (needed if REF is in several)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--payment-id", help="it exists on the API with this id: track it")
    action.add_argument("--track-again", action="store_true", help="track the known id again")
    action.add_argument("--recreate", action="store_true", help="it does not exist: post again")
    action.add_argument("--give-up", action="store_true", help="mark it failed")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from worker.producer import Producer

    settings = settings_or_exit()
    producer = run_or_report(lambda: Producer.from_settings(settings))
    record = run_or_report(lambda: producer.get_payment(args.reference_id, account=args.account))
    note = "resolved by an operator"
    # The operator's decision: target state, next step, and what the record forgets or learns.
    fields: dict[str, str | int | float] = {"phase": "", "last_error": note}
    if args.payment_id or args.track_again:
        payment_id = args.payment_id or record.payment_id
        if not payment_id:
            print("paypoll resolve: no payment id known; pass --payment-id", file=sys.stderr)
            return 2
        target, next_step = State.PENDING, "track"
        fields.update(payment_id=payment_id, created_at="$now")
    elif args.recreate:
        target, next_step = State.QUEUED, "create"
        fields.update(payment_id="")
    else:
        target, next_step = State.FAILED, ""
        fields.update(last_error="given up by an operator")
    moved = producer.store.transition(
        record.account,
        record.reference_id,
        target,
        operator=True,
        next_step=next_step,
        fields=fields,
    )
    if not moved.moved:
        print(
            f"paypoll resolve: {record.reference_id} is {moved.previous}; "
            f"an operator cannot move it to {target.value}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print_json(
            {"reference_id": record.reference_id, "from": moved.previous, "to": target.value}
        )
    else:
        print(f"{record.reference_id}: {moved.previous} -> {target.value}")
    return 0
