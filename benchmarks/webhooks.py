"""Webhook delivery (issue 12, part 4): delivery lag while the endpoint answers, and the drain
time after an outage.

A private redis-server, the sandbox (one key at 5 req/s), a `paypoll worker` fleet (1 process,
4 threads) with PAYPOLL_WEBHOOK_URL on a real HTTP receiver (tests/webhook_receiver.py, which
verifies every signature with the `standardwebhooks` package and answers 204).

- lag: payments submitted at 2/s, payers paying 0.5-2 s after the create; for every webhook,
  its arrival less its transition's time (the body's `timestamp`, Redis clock, same machine);
- outage: the receiver is down for --outage seconds (default 600, the issue's ten minutes)
  while payments keep coming at 0.5/s; it comes back; the drain time is the last webhook's
  arrival less the receiver's return (floor: everything within 60 s).

    .venv/bin/python benchmarks/webhooks.py [--outage 600] [--write-docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FleetProcess, machine, make_accounts, percentile, settings_for, stack
from common import write_section as write_docs_section

from tests.webhook_receiver import WebhookReceiver, new_secret

FINAL = {"paid", "expired", "cancelled"}


def _transition_time(payload: dict[str, object]) -> float:
    return datetime.fromisoformat(str(payload["timestamp"]).replace("Z", "+00:00")).timestamp()


def _wanted(producer: object, refs: list[str]) -> set[tuple[str, str]] | None:
    """(reference_id, type) of every webhook due once all ``refs`` are final, else None."""
    states = {r: producer.get_payment(r).state for r in refs}  # type: ignore[attr-defined]
    if not all(s in FINAL for s in states.values()):
        return None
    return {(r, "payment.created") for r in refs} | {(r, f"payment.{s}") for r, s in states.items()}


def _arrived(receiver: WebhookReceiver) -> set[tuple[str, str]]:
    return {(p["data"]["reference_id"], p["type"]) for p in receiver.payloads()}


def run(outage: float, lag_payments: int) -> dict[str, float]:
    from worker.keys import Keys
    from worker.producer import Producer

    secret = new_secret()
    receiver = WebhookReceiver(secret=secret)
    receiver.up()
    accounts = make_accounts(1)
    env = {"PAYPOLL_WEBHOOK_URL": receiver.url, "PAYPOLL_WEBHOOK_SECRET": secret}
    figures: dict[str, float] = {}
    with stack(accounts, account_rate=5, env=env, pay_after="0.5:2") as st:
        producer = Producer.from_settings(settings_for(st))
        fleet = FleetProcess(st, processes=1, threads=4)

        def submit(prefix: str, i: int) -> str:
            return producer.submit_payment(
                account=accounts[0].name,
                amount="10",
                redirect_url="https://shop.example/ok",
                reference_id=f"{prefix}-{i}",
            )

        def wait_all(refs: list[str], timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                wanted = _wanted(producer, refs)
                if wanted is not None and wanted <= _arrived(receiver):
                    return
                time.sleep(0.1)
            raise RuntimeError(f"webhooks missing after {timeout} s")

        try:
            fleet.wait_workers()
            time.sleep(2.0)
            refs = []
            for i in range(lag_payments):
                refs.append(submit("lag", i))
                time.sleep(0.5)
            wait_all(refs, 120)
            lags = [r.at - _transition_time(r.payload) for r in receiver.received]
            figures.update(
                lag_webhooks=len(lags),
                lag_p50=percentile(lags, 50),
                lag_p99=percentile(lags, 99),
                lag_max=max(lags),
            )
            print(f"lag: {figures}", flush=True)
            receiver.down()
            down_at = time.monotonic()
            outage_refs = []
            i = 0
            while time.monotonic() - down_at < outage:
                outage_refs.append(submit("outage", i))
                i += 1
                time.sleep(2.0)
            client = producer.store.redis
            backlog = int(client.xlen(Keys("bench").webhook("global", "queue")))
            before = len(receiver.received)
            receiver.up()
            back_at = time.time()
            wait_all(outage_refs, 300)
            outage_arrivals = receiver.received[before:]
            figures.update(
                outage_s=outage,
                outage_payments=len(outage_refs),
                backlog_at_return=backlog,
                drained_webhooks=len(outage_arrivals),
                first_after_return=min(r.at for r in outage_arrivals) - back_at,
                drain_s=max(r.at for r in outage_arrivals) - back_at,
                bad_signatures=receiver.bad_signatures,
            )
            print(f"outage: {figures}", flush=True)
        finally:
            fleet.stop()
            receiver.down()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=600.0)
    parser.add_argument("--lag-payments", type=int, default=100)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    where = machine()
    f = run(args.outage, args.lag_payments)
    met = "met" if f["drain_s"] <= 60 else "NOT met"
    text = "\n".join(
        [
            "### Webhooks (issue 12): delivery lag, and the drain after an outage",
            "",
            f"`benchmarks/webhooks.py --outage {args.outage:g} --lag-payments "
            f"{args.lag_payments}`: {where}. One key at 5 req/s on the sandbox, a fleet of 1 "
            "process x 4 threads, PAYPOLL_WEBHOOK_URL on a real HTTP receiver that verifies "
            "every signature with `standardwebhooks` and answers 204; default webhook "
            "settings (concurrency 8, probe backoff 1 s doubling to 30 s).",
            "",
            "| figure | value |",
            "|---|---|",
            f"| webhooks measured for lag (endpoint up) | {f['lag_webhooks']:.0f} |",
            f"| delivery lag p50 / p99 / max (transition to 2xx) | {f['lag_p50'] * 1000:.0f} ms "
            f"/ {f['lag_p99'] * 1000:.0f} ms / {f['lag_max'] * 1000:.0f} ms |",
            f"| outage | {f['outage_s']:.0f} s, {f['outage_payments']:.0f} payments created "
            "meanwhile |",
            f"| backlog when the receiver came back | {f['backlog_at_return']:.0f} webhooks |",
            f"| first delivery after the return | {f['first_after_return']:.1f} s (the next "
            "probe: the backoff is capped at 30 s) |",
            f"| all {f['drained_webhooks']:.0f} outage webhooks delivered after the return | "
            f"{f['drain_s']:.1f} s (floor: within 60 s: {met}) |",
            f"| bad signatures seen by the receiver | {f['bad_signatures']:.0f} |",
        ]
    )
    print(text)
    if args.write_docs:
        write_docs_section("webhooks", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
