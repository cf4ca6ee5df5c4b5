"""`paypoll webhooks`: each endpoint's state and backlog, dead letters, replay, enable."""

from __future__ import annotations

import argparse
import functools
import time

from worker.commands.common import print_json, run_or_report, settings_or_exit
from worker.errors import ValidationError

HELP = "webhook endpoints: status, failed (dead letters), replay, enable"
DESCRIPTION = (
    "status: each endpoint's state, backlog and dead letters. failed: the dead-lettered "
    "webhooks. replay: put dead letters back in their endpoint's queue (same webhook-id). "
    "enable: send again to an endpoint disabled by a 410 Gone. Endpoints are named global "
    "(PAYPOLL_WEBHOOK_URL) or account/NAME (an account's own webhook_url)."
)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = sub.add_parser("status", help="each endpoint's state, backlog and dead letters")
    status.add_argument("--json", action="store_true", help="one JSON object per endpoint")
    failed = sub.add_parser("failed", help="list dead-lettered webhooks")
    failed.add_argument("--endpoint", help="only this endpoint")
    failed.add_argument("--json", action="store_true", help="one JSON object per webhook")
    replay = sub.add_parser("replay", help="send dead letters again")
    replay.add_argument("--endpoint", required=True, help="the endpoint whose dead letters")
    replay.add_argument("webhook_ids", nargs="*", metavar="ID", help="webhook-ids (default: all)")
    enable = sub.add_parser("enable", help="send again to an endpoint disabled by a 410")
    enable.add_argument("endpoint", metavar="ENDPOINT")


def run(args: argparse.Namespace) -> int:
    from worker.connection import connect_redis
    from worker.webhooks.endpoints import Endpoints
    from worker.webhooks.queue import EndpointQueue

    settings = settings_or_exit()
    client = connect_redis(settings.redis_url)
    keys = settings.keys()
    configured = set(Endpoints.from_settings(settings).by_name)

    def known() -> list[str]:
        routed = {m.decode() for m in client.smembers(keys.webhook_endpoints())}  # type: ignore[union-attr]
        return sorted(configured | routed)

    def queue_of(name: str) -> EndpointQueue:
        names = known()
        if name not in names:
            listed = ", ".join(names) or "none"
            raise ValidationError("endpoint", f"no webhook endpoint {name!r} (known: {listed})")
        return EndpointQueue(client, keys, name)

    if args.action == "status":
        rows = []
        for name in run_or_report(known):
            queue = EndpointQueue(client, keys, name)
            state = run_or_report(queue.state)
            oldest = run_or_report(functools.partial(queue.peek, 1))
            rows.append(
                {
                    "endpoint": name,
                    "configured": name in configured,
                    "state": state.status,
                    "backlog": run_or_report(queue.backlog),
                    "oldest_age": round(time.time() - oldest[0].at, 1) if oldest else None,
                    "dead_letters": len(run_or_report(queue.dead_letters)),
                    "failures": state.failures,
                    "last_error": state.last_error or None,
                    "disabled_reason": state.disabled_reason or None,
                }
            )
        if args.json:
            for row in rows:
                print_json(row)
            return 0
        if not rows:
            print("no webhook endpoint (set PAYPOLL_WEBHOOK_URL and PAYPOLL_WEBHOOK_SECRET)")
            return 0
        print(f"{'endpoint':<28} {'state':<9} {'backlog':>8} {'oldest':>9} {'dead':>6}  last error")
        for row in rows:
            age = "-" if row["oldest_age"] is None else f"{row['oldest_age']}s"
            print(
                f"{row['endpoint']:<28} {row['state']:<9} {row['backlog']:>8} {age:>9} "
                f"{row['dead_letters']:>6}  {row['disabled_reason'] or row['last_error'] or ''}"
            )
        return 0
    if args.action == "failed":
        names = [args.endpoint] if args.endpoint else run_or_report(known)
        for name in names:
            queue = run_or_report(functools.partial(queue_of, name))
            for dead in run_or_report(queue.dead_letters):
                entry = {
                    "endpoint": name,
                    "webhook_id": dead.msg_id,
                    "type": dead.type,
                    "account": dead.account,
                    "reference_id": dead.reference_id,
                    "at": dead.at,
                    "error": dead.error,
                }
                if args.json:
                    print_json(entry)
                else:
                    print(
                        f"{name}  {dead.msg_id}  {dead.type}  {dead.account}/{dead.reference_id}"
                        f"  {dead.error}"
                    )
        return 0
    if args.action == "replay":
        queue = run_or_report(lambda: queue_of(args.endpoint))
        moved = run_or_report(lambda: queue.replay(args.webhook_ids or None))
        print(f"{moved} webhook(s) of {args.endpoint} queued again")
        return 0 if moved or not args.webhook_ids else 1
    queue = run_or_report(lambda: queue_of(args.endpoint))
    run_or_report(queue.enable)
    print(
        f"{args.endpoint} enabled: its {run_or_report(queue.backlog)} queued webhook(s) go out now"
    )
    return 0
