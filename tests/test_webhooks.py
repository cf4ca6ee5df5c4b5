"""Webhooks with real parts: a real HTTP receiver verifying every signature with the
``standardwebhooks`` package, real fleets against the sandbox, SIGKILLs, an outage, 410s,
dead letters and replays, and a hanging endpoint next to a healthy one."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.fleet_harness import paypoll_env, running_fleet, write_accounts, write_accounts_file
from tests.redis_server import running_redis
from tests.sandbox_fixture import running_sandbox
from tests.waiting import wait_until
from tests.webhook_receiver import WebhookReceiver, new_secret, running_receiver
from worker.errors import ConfigError
from worker.keys import Keys
from worker.producer import Producer
from worker.settings import load_settings
from worker.webhooks.driver import probe_delay
from worker.webhooks.signing import secret_key, signed_headers

FINAL = {"paid", "expired", "cancelled"}
CLIENT = {"shop": "shop-secret-9Xq"}


def test_signatures_verify_with_the_standard_webhooks_library() -> None:
    secret = new_secret()
    body = b'{"type":"payment.paid","data":{"reference_id":"r1"}}'
    headers = signed_headers(secret_key(secret), "msg_1-0", int(time.time()), body)
    assert Webhook(secret).verify(body, headers)["type"] == "payment.paid"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"paid", b"cancelled"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_the_probe_backoff_doubles_from_1_s_and_never_exceeds_30_s() -> None:
    rng = random.Random(4)
    delays = [probe_delay(n, rng=rng) for n in range(1, 12)]
    assert 0.9 <= delays[0] <= 1.1 and 1.8 <= delays[1] <= 2.2 and 3.6 <= delays[2] <= 4.4
    assert all(d <= 30.0 for d in delays) and delays[-1] >= 27.0
    assert probe_delay(10_000, rng=rng) <= 30.0


def test_bad_webhook_settings_name_the_field_and_never_echo_the_secret(tmp_path: Path) -> None:
    secret = new_secret()
    base = {"PAYPOLL_CLIENT_ID": "c", "PAYPOLL_CLIENT_SECRET": "s"}
    ok = load_settings(
        {
            **base,
            "PAYPOLL_WEBHOOK_URL": "https://hooks.test/x",
            "PAYPOLL_WEBHOOK_SECRET": secret,
            "PAYPOLL_WEBHOOK_EVENTS": "paid,created",
        }
    )
    assert ok.webhook_events == ("paid", "created") and secret not in repr(ok)
    cases = {
        "PAYPOLL_WEBHOOK_SECRET": {
            "PAYPOLL_WEBHOOK_URL": "https://h.test/",
            "PAYPOLL_WEBHOOK_SECRET": "whsec_not base64!",
        },
        "PAYPOLL_WEBHOOK_EVENTS": {"PAYPOLL_WEBHOOK_EVENTS": "paid,refunded"},
    }
    for field, env in cases.items():
        with pytest.raises(ConfigError) as err:
            load_settings({**base, **env})
        assert str(err.value).startswith(field) and "not base64" not in str(err.value)
    with pytest.raises(ConfigError, match="PAYPOLL_WEBHOOK_SECRET: required"):
        load_settings({**base, "PAYPOLL_WEBHOOK_URL": "https://h.test/"})
    with pytest.raises(ConfigError, match="plain http:// is refused") as err:
        load_settings(
            {
                **base,
                "PAYPOLL_WEBHOOK_URL": "http://hooks.example.com/x",
                "PAYPOLL_WEBHOOK_SECRET": secret,
            }
        )
    assert secret not in str(err.value)
    allowed = load_settings(
        {
            **base,
            "PAYPOLL_WEBHOOK_URL": "http://hooks.example.com/x",
            "PAYPOLL_WEBHOOK_SECRET": secret,
            "PAYPOLL_WEBHOOK_ALLOW_HTTP": "1",
        }
    )
    assert allowed.webhook_url.startswith("http://")
    # Per account, in the accounts file: both keys, valid, or a line-numbered error.
    path = write_accounts_file(tmp_path / "a.toml", [("acme", "id", "sec")])
    path.write_text(path.read_text() + 'webhook_url = "https://acme.test/hooks"\n')
    with pytest.raises(ConfigError, match=r"a.toml:1: \[accounts.acme\]: needs webhook_secret"):
        load_settings({"PAYPOLL_ACCOUNTS_FILE": str(path)})
    path.write_text(path.read_text() + f'webhook_secret = "{secret}"\n')
    acme = load_settings({"PAYPOLL_ACCOUNTS_FILE": str(path)}).accounts["acme"]
    assert acme.webhook_url == "https://acme.test/hooks" and secret not in repr(acme)


def _env(
    tmp_path: Path, redis_url: str, key_prefix: str, api_url: str, **extra: Any
) -> dict[str, str]:
    return paypoll_env(
        redis_url=redis_url,
        api_url=api_url,
        key_prefix=key_prefix,
        accounts_file=write_accounts(tmp_path, CLIENT, 50),
        poll_first_delay=0.3,
        poll_max_delay=1,
        **extra,
    )


def _submit(producer: Producer, prefix: str, n: int, account: str = "shop") -> list[str]:
    return [
        producer.submit_payment(
            account=account,
            amount="5",
            redirect_url="https://shop.test/ok",
            reference_id=f"{prefix}-{i}",
        )
        for i in range(n)
    ]


def _by_type(receiver: WebhookReceiver) -> dict[tuple[str, str], set[str]]:
    """(reference_id, type) -> the webhook-ids it arrived under."""
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for got in list(receiver.received):
        found[(got.payload["data"]["reference_id"], got.payload["type"])].add(got.webhook_id)
    return found


def test_every_outcome_arrives_through_an_outage_and_sigkills(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """The receiver is down for 30 s and fails 5% of the rest; a worker process is SIGKILLed
    every 3 s. Every payment's created and final webhooks arrive, signed, duplicates only
    under the same webhook-id, and the backlog drains within 60 s of the receiver's return."""
    secret = new_secret()
    rng = random.Random(7)
    with (
        running_receiver(secret, fail_share=0.05, seed=3) as receiver,
        running_sandbox(
            client=f"shop:{CLIENT['shop']}",
            rate=50,
            pay_after="0.5:3",
            outcomes="paid=0.6,expired=0.2,cancelled=0.2",
            seed=5,
        ) as sandbox,
    ):
        env = _env(
            tmp_path,
            redis_url,
            key_prefix,
            sandbox.url,
            webhook_url=receiver.url,
            webhook_secret=secret,
        )
        producer = Producer.from_settings(load_settings(env))
        with running_fleet(env, processes=2, threads=4) as fleet:
            fleet.wait_started()
            refs = _submit(producer, "early", 10)
            wait_until(lambda: len(receiver.ids()) >= 5, timeout=30, what="first webhooks")
            receiver.down()
            down_at = time.monotonic()
            refs += _submit(producer, "outage", 20)
            kills = 0
            while time.monotonic() - down_at < 30:
                time.sleep(3)
                workers = fleet.workers()
                if workers:
                    os.kill(rng.choice(workers), 9)
                    kills += 1
            finals = {r: producer.get_payment(r).state for r in refs}
            receiver.up()
            back_at = time.time()
            wanted = {(r, "payment.created") for r in refs}

            def all_arrived() -> bool:
                states = {r: producer.get_payment(r).state for r in refs}
                if not all(s in FINAL for s in states.values()):
                    return False
                finals.update(states)
                want = wanted | {(r, f"payment.{s}") for r, s in states.items()}
                return want <= set(_by_type(receiver))

            wait_until(all_arrived, timeout=120, interval=0.2, what="every webhook")
            log = fleet.output()
    assert kills >= 9 and receiver.bad_signatures == 0 and receiver.refused > 0
    by_type = _by_type(receiver)
    # Each event arrived under exactly one webhook-id; a re-delivery repeats id and payload.
    assert all(len(ids) == 1 for ids in by_type.values()), by_type
    payloads: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for got in receiver.received:
        payloads[got.webhook_id].append(got.payload)
    assert all(all(p == same[0] for p in same) for same in payloads.values())
    for ref in refs:
        [final_id] = by_type[(ref, f"payment.{finals[ref]}")]
        final = payloads[final_id][0]
        assert final["data"]["state"] == finals[ref] and final["data"]["amount"] == "5"
        assert final["data"]["payment_id"] and final["data"]["url"]
    # Delivered within 60 s of the receiver's return (the probe backoff is capped at 30 s).
    last = max(r.at for r in receiver.received)
    assert last - back_at < 60, last - back_at
    assert secret not in log and CLIENT["shop"] not in log


def _paypoll(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "webhooks", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _status(env: dict[str, str]) -> dict[str, Any]:
    shown = _paypoll(env, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    return {row["endpoint"]: row for row in map(json.loads, shown.stdout.splitlines())}


def test_a_410_disables_the_endpoint_until_enabled_and_dead_letters_replay(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    secret = new_secret()
    with (
        running_receiver(secret, status=410) as receiver,
        running_sandbox(
            client=f"shop:{CLIENT['shop']}", rate=50, pay_after="0.3:0.6", outcomes="paid=1", seed=2
        ) as sandbox,
    ):
        env = _env(
            tmp_path,
            redis_url,
            key_prefix,
            sandbox.url,
            webhook_url=receiver.url,
            webhook_secret=secret,
            webhook_events="paid",
            webhook_retry_for=2,
        )
        producer = Producer.from_settings(load_settings(env))
        with running_fleet(env, processes=1, threads=4) as fleet:
            fleet.wait_started()
            refs = _submit(producer, "gone", 3)
            wait_until(
                lambda: _status(env).get("global", {}).get("state") == "disabled",
                timeout=30,
                what="the endpoint disabled by its 410",
            )
            wait_until(
                lambda: all(producer.get_payment(r).state == "paid" for r in refs),
                timeout=30,
                what="3 paid",
            )
            status = _status(env)["global"]
            assert status["backlog"] == 3 and "410" in status["disabled_reason"]
            assert receiver.ids() == []  # a 410 is not a delivery; nothing more is tried
            assert '"webhooks.endpoint_disabled"' in fleet.output()
            # The operator fixes the receiver, then enables: everything arrives, once each.
            receiver.status = 204
            enabled = _paypoll(env, "enable", "global")
            assert enabled.returncode == 0 and "3 queued" in enabled.stdout
            wait_until(lambda: len(receiver.ids()) == 3, timeout=20, what="3 webhooks")
            # Down longer than retry_for: dead-lettered, listed, replayed under the same id.
            receiver.down()
            more = _submit(producer, "dead", 2)
            wait_until(
                lambda: _status(env)["global"]["dead_letters"] == 2,
                timeout=40,
                what="2 dead letters",
            )
            failed = _paypoll(env, "failed", "--json")
            listed = [json.loads(line) for line in failed.stdout.splitlines()]
            assert sorted(e["reference_id"] for e in listed) == sorted(more)
            assert all(e["error"] and e["type"] == "payment.paid" for e in listed)
            receiver.up()
            replayed = _paypoll(env, "replay", "--endpoint", "global")
            assert replayed.returncode == 0 and "2 webhook(s)" in replayed.stdout
            wait_until(lambda: len(receiver.ids()) == 5, timeout=40, what="the replayed ones")
    assert sorted(receiver.ids()[3:]) == sorted(e["webhook_id"] for e in listed)
    assert receiver.bad_signatures == 0
    unknown = _paypoll(env, "enable", "nowhere")
    assert unknown.returncode == 1 and "nowhere" in unknown.stderr
    assert secret not in unknown.stdout + unknown.stderr + "".join(
        _paypoll(env, a).stdout for a in ("status", "failed")
    )


def test_a_hanging_endpoint_delays_no_other_endpoint_and_no_payment(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    slow_secret, fast_secret = new_secret(), new_secret()
    clients = {"slow": "slow-secret-1", "fast": "fast-secret-2"}
    with (
        running_receiver(slow_secret, hang=20) as slow,
        running_receiver(fast_secret) as fast,
        running_sandbox(
            client=[f"{c}:{s}" for c, s in clients.items()],
            rate=50,
            pay_after="0.3:0.8",
            outcomes="paid=1",
            seed=4,
        ) as sandbox,
    ):
        path = write_accounts(tmp_path, clients, 50)
        text = (
            path.read_text()
            .replace(
                "[accounts.fast]",
                f'[accounts.fast]\nwebhook_url = "{fast.url}"\nwebhook_secret = "{fast_secret}"',
            )
            .replace(
                "[accounts.slow]",
                f'[accounts.slow]\nwebhook_url = "{slow.url}"\nwebhook_secret = "{slow_secret}"',
            )
        )
        path.write_text(text)
        env = paypoll_env(
            redis_url=redis_url,
            api_url=sandbox.url,
            key_prefix=key_prefix,
            accounts_file=path,
            poll_first_delay=0.3,
            poll_max_delay=1,
            webhook_read_timeout=2,
            webhook_events="paid",
        )
        producer = Producer.from_settings(load_settings(env))
        with running_fleet(env, processes=1, threads=4):
            slow_refs = _submit(producer, "s", 5, account="slow")
            fast_refs = _submit(producer, "f", 5, account="fast")
            wait_until(lambda: len(fast.ids()) == 5, timeout=30, what="the fast endpoint's 5")
            assert all(producer.get_payment(r, account="slow").state == "paid" for r in slow_refs)
            paid_at = {r: producer.get_payment(r, account="fast").terminal_at for r in fast_refs}
            lags = [
                got.at - (paid_at[got.payload["data"]["reference_id"]] or 0)
                for got in fast.received
            ]
            assert max(lags) < 3.0, lags
            # Its read timeout (2 s) makes the hanging endpoint failing; nothing was accepted.
            wait_until(
                lambda: _status(env)["account/slow"]["state"] == "failing",
                timeout=15,
                what="the hanging endpoint failing",
            )
            assert slow.ids() == []
            state = _status(env)
            assert state["account/slow"]["backlog"] == 5
            assert state["account/fast"]["backlog"] == 0


def test_queued_webhooks_survive_a_redis_restart_on_aof(tmp_path: Path) -> None:
    """Webhooks queued while the receiver is down, then Redis (appendonly yes) restarted: the
    fleet reconnects and every one is delivered once the receiver is back."""
    secret = new_secret()
    with (
        running_redis(appendonly=True) as server,
        running_receiver(secret) as receiver,
        running_sandbox(
            client=f"shop:{CLIENT['shop']}", rate=50, pay_after="0.3:0.6", outcomes="paid=1", seed=6
        ) as sandbox,
    ):
        env = _env(
            tmp_path,
            server.url,
            "aof",
            sandbox.url,
            webhook_url=receiver.url,
            webhook_secret=secret,
            webhook_events="created,paid",
        )
        producer = Producer.from_settings(load_settings(env))
        receiver.down()
        with running_fleet(env, processes=1, threads=4):
            refs = _submit(producer, "aof", 5)
            queue = Keys("aof").webhook("global", "queue")
            client = redis.Redis.from_url(server.url)
            wait_until(lambda: client.xlen(queue) == 10, timeout=30, what="10 webhooks queued")
            client.close()
            server.restart()
            receiver.up()
            wait_until(
                lambda: len(set(receiver.ids())) == 10,
                timeout=60,
                what="10 webhooks after the restart",
            )
    assert {(p["data"]["reference_id"], p["type"]) for p in receiver.payloads()} == {
        (r, t) for r in refs for t in ("payment.created", "payment.paid")
    }
