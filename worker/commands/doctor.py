"""`paypoll doctor`: check a deployment's Redis, accounts and host, one line each with a fix."""

from __future__ import annotations

import argparse

from worker.commands.common import print_json, settings_or_exit

HELP = "check Redis, persistence, eviction, clocks, credentials, metrics port and queues"
DESCRIPTION = (
    "Check what operators get wrong, one line each, saying how to fix it: Redis reachable and "
    "its version; AOF persistence (appendonly); maxmemory-policy noeviction; the Redis clock "
    "against this host's; each account's credentials (one token call per account, through "
    "the rate limiter; accounts named by alias, never a secret); the metrics port; the queues' "
    "depth and the oldest due step. Exit status: 0 every check ok, 1 something to fix (a "
    "warning or a failure), 2 bad configuration."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object with every check")


def run(args: argparse.Namespace) -> int:
    from worker.doctor import exit_status, run_checks
    from worker.logs import configure_logging

    settings = settings_or_exit()
    # The findings say what the calls met; their log events would only repeat it (on stderr).
    configure_logging(fmt=settings.log_format, level="ERROR")
    findings = run_checks(settings)
    status = exit_status(findings)
    if args.json:
        print_json({"ok": status == 0, "checks": [finding.as_dict() for finding in findings]})
    else:
        for finding in findings:
            print(finding.line())
    return status
