"""The ``paypoll`` command: one sub-command per module, each with ``configure`` and ``run``.

Each sub-command module exposes ``HELP`` (one line), ``configure(parser)`` to add its options,
and ``run(args) -> int``. Modules are imported only when the command line is built, and must not
connect to anything or read settings at import time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from worker import __version__

# command -> module. Order is the order of `paypoll --help`.
COMMANDS: dict[str, str] = {
    "worker": "worker.commands.worker",
    "submit": "worker.commands.submit",
    "track": "worker.commands.track",
    "status": "worker.commands.status",
    "list": "worker.commands.listing",
    "events": "worker.commands.events",
    "webhooks": "worker.commands.webhooks",
    "resolve": "worker.commands.resolve",
    "doctor": "worker.commands.doctor",
    "top": "worker.commands.top",
    "sandbox": "worker.sandbox.cli",
    "demo": "worker.demo.cli",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every sub-command's options."""
    parser = argparse.ArgumentParser(
        prog="paypoll",
        description=(
            "Rate-limited, durable payment-polling worker for the Alternative Payments API. "
            "Settings come from PAYPOLL_* environment variables (see README)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"paypoll {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.configure(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``paypoll`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
