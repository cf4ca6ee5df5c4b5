"""`paypoll submit`: one payment from options, or thousands from a file."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from worker.commands.common import print_json, run_or_report, settings_or_exit
from worker.errors import ValidationError

HELP = "submit a payment, or a file of payments, to be created and tracked"
DESCRIPTION = (
    "Validate and record payments for the workers to create and track. With --file, every row "
    "of a CSV (header: account,amount,currency,redirect_url,reference_id) or JSON-lines file is "
    "validated first; invalid rows are reported with their line number and reason, the valid "
    "ones are submitted. Submitting the same payment twice is harmless. Exit status: 0 all "
    "submitted, 1 some rows refused, 2 bad usage or configuration."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--account", help="account alias (required unless every row has one)")
    parser.add_argument("--amount", help="decimal string, at most 2 decimals, e.g. 100 or 12.50")
    parser.add_argument("--currency", default="USD", help="currency code (the API knows USD)")
    parser.add_argument("--redirect-url", help="absolute https:// URL the payer returns to")
    parser.add_argument("--reference-id", help="your reference (generated when omitted)")
    parser.add_argument("--file", help="a .csv or .jsonl file of payments ('-' for stdin CSV)")
    parser.add_argument(
        "--format", choices=["csv", "jsonl"], help="file format (default: by extension)"
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait until the payment's hosted url is known and print it (one payment only)",
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --wait: give up after this long, exit status 1 (default 30)",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON lines")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr for --file"
    )


def run(args: argparse.Namespace) -> int:
    from worker.producer import Producer

    settings = settings_or_exit()
    producer = run_or_report(lambda: Producer.from_settings(settings))
    if args.file:
        if args.wait:
            print("paypoll submit: --wait takes one payment, not --file", file=sys.stderr)
            return 2
        return _submit_file(producer, args)
    missing = [
        name for name in ("account", "amount", "redirect_url") if getattr(args, name) is None
    ]
    if missing:
        names = ", ".join("--" + m.replace("_", "-") for m in missing)
        print(f"paypoll submit: missing {names} (or use --file)", file=sys.stderr)
        return 2
    ref = run_or_report(
        lambda: producer.submit_payment(
            account=args.account,
            amount=args.amount,
            currency=args.currency,
            redirect_url=args.redirect_url,
            reference_id=args.reference_id,
        )
    )
    if args.wait:
        return _wait_for_url(producer, args.account, ref, args.wait_timeout, as_json=args.json)
    if args.json:
        print_json({"account": args.account, "reference_id": ref, "state": "queued"})
    else:
        print(ref)
    return 0


def _wait_for_url(
    producer: object, account: str, ref: str, timeout: float, *, as_json: bool
) -> int:
    """Print the hosted url once known (0), or why there is none (1)."""
    from worker.producer import Producer

    assert isinstance(producer, Producer)
    record = run_or_report(lambda: producer.wait_for(ref, account=account, timeout=timeout))
    if as_json:
        print_json(
            {"account": account, "reference_id": ref, "state": record.state, "url": record.url}
        )
    elif record.url:
        print(record.url)
    if not record.url:
        reason = f": {record.last_error}" if record.last_error else ""
        print(f"paypoll submit: {ref} is {record.state}, no url{reason}", file=sys.stderr)
        return 1
    return 0


class Progress:
    """A one-line progress bar on a terminal (nothing when not a TTY or disabled)."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.last = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.1):
            return
        self.last = now
        width = 30
        filled = int(width * done / self.total)
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def _submit_file(producer: object, args: argparse.Namespace) -> int:
    from worker.importer import RowError, detect_format, load_file
    from worker.producer import Producer

    assert isinstance(producer, Producer)
    started = time.monotonic()
    try:
        fmt = args.format or ("csv" if args.file == "-" else detect_format(args.file))
        if args.account is not None:
            producer.settings.account(args.account)
        if args.file == "-":
            result = load_file(
                sys.stdin.buffer,
                fmt,
                accounts=producer.settings.accounts,
                default_account=args.account,
            )
        else:
            with open(args.file, "rb") as raw:
                result = load_file(
                    raw, fmt, accounts=producer.settings.accounts, default_account=args.account
                )
    except ValidationError as exc:
        print(f"paypoll submit: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"paypoll submit: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    for error in result.errors:
        if args.json:
            problems = [{"field": name, "reason": reason} for name, reason in error.problems]
            print_json(
                {
                    "line": error.line,
                    "field": error.field,
                    "error": error.reason,
                    "problems": problems,
                }
            )
        else:
            print(f"refused {error}", file=sys.stderr)

    progress = Progress(len(result.specs), sys.stderr, not args.no_progress)
    new = existing = 0
    done = 0
    specs = iter(result.specs)
    outcomes = run_or_report(lambda: producer.submit_specs(specs))
    for spec, outcome in zip(result.specs, outcomes, strict=True):
        done += 1
        if isinstance(outcome, ValidationError):
            result.errors.append(RowError.of(0, outcome.problems))
            print(f"refused {spec.account}/{spec.reference_id}: {outcome}", file=sys.stderr)
        elif outcome:
            new += 1
        else:
            existing += 1
        progress.update(done)
    progress.update(done, force=True)
    progress.close()
    seconds = time.monotonic() - started
    summary = {
        "valid": len(result.specs),
        "submitted": new,
        "already_submitted": existing,
        "refused": len(result.errors),
        "seconds": round(seconds, 3),
    }
    if args.json:
        print_json({"summary": summary})
    else:
        print(
            f"submitted {new}, already submitted {existing}, refused {len(result.errors)} "
            f"in {seconds:.2f}s"
        )
    return 1 if result.errors else 0
