"""`paypoll doctor` (issue 15) against a private Redis configured wrong on purpose, the real
sandbox with one refused account, and a metrics port taken by another program."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.fleet_harness import paypoll_env, write_accounts_file
from tests.redis_server import free_port, running_redis
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from worker.doctor import FAIL, OK, WARN, check_eviction, check_queues
from worker.keys import Keys
from worker.producer import Producer
from worker.settings import load_settings

SECRETS = {"acme": "s3cret-acme-Vx81", "globex": "s3cret-globex-Qm27"}
WRONG = "wrong-secret-for-globex-Zt55"


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox(client=[f"{cid}:{secret}" for cid, secret in SECRETS.items()]) as sb:
        yield sb


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`paypoll doctor ARGS` as a user runs it; no secret may appear in what it prints."""
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "doctor", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    for secret in (*SECRETS.values(), WRONG):
        assert secret not in done.stdout + done.stderr
    return done


def by_check(output: str) -> dict[str, dict[str, Any]]:
    report = json.loads(output)
    return {finding["check"]: finding for finding in report["checks"]}


def _env(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, secrets: dict[str, str]
) -> dict[str, str]:
    accounts = write_accounts_file(
        tmp_path / "accounts.toml", [(cid, cid, secret) for cid, secret in secrets.items()]
    )
    return paypoll_env(
        redis_url=redis_url, api_url=sandbox.url, accounts_file=accounts, key_prefix="pp-doctor"
    )


def test_doctor_names_each_wrong_setting_and_how_to_fix_it(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    with running_redis(appendonly=False) as server, socket.socket() as taken:
        client = redis.Redis.from_url(server.url)
        client.config_set("maxmemory", "100mb")
        client.config_set("maxmemory-policy", "allkeys-lru")
        env = _env(tmp_path, server.url, sandbox, {"acme": SECRETS["acme"], "globex": WRONG})
        taken.bind(("127.0.0.1", int(env["PAYPOLL_METRICS_PORT"])))
        taken.listen()  # another program holds the fleet's metrics port

        done = doctor(env, "--json")
        assert done.returncode == 1, done.stderr
        found = by_check(done.stdout)
        assert json.loads(done.stdout)["ok"] is False
        version = str(client.info("server")["redis_version"])
        assert found["redis"]["status"] == OK and version in found["redis"]["message"]
        assert found["persistence"]["status"] == WARN
        assert "appendonly" in found["persistence"]["message"] + found["persistence"]["fix"]
        assert found["maxmemory-policy"]["status"] == FAIL
        assert "allkeys-lru" in found["maxmemory-policy"]["message"]
        assert "noeviction" in found["maxmemory-policy"]["fix"]
        assert found["clock"]["status"] == OK
        assert found["account acme"]["status"] == OK
        refused = found["account globex"]
        assert refused["status"] == FAIL and "refused" in refused["message"]
        assert "[accounts.globex]" in refused["fix"]
        assert found["metrics-port"]["status"] == WARN
        assert "PAYPOLL_METRICS_PORT" in found["metrics-port"]["fix"]
        assert found["queues"]["status"] == OK
        # Exactly one token call per account, through the limiter, nothing else sent.
        stats = sandbox.stats()["clients"]
        assert stats["acme"]["requests"] == {"POST /oauth/token": {"200": 1}}
        assert stats["globex"]["requests"] == {"POST /oauth/token": {"403": 1}}

        # The same, one line per check, each not-ok one saying how to fix it.
        text = doctor(env)
        assert text.returncode == 1
        lines = text.stdout.splitlines()
        assert len(lines) == len(found)
        assert [line.split()[0] for line in lines if "fix:" in line] == [
            "WARN",
            "FAIL",
            "FAIL",
            "WARN",
        ]
        assert any(line.startswith("WARN  persistence:") and "appendonly" in line for line in lines)
        client.close()


def test_doctor_is_quiet_and_exits_0_on_a_good_deployment(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    with running_redis(appendonly=True) as server:
        env = _env(tmp_path, server.url, sandbox, SECRETS)
        Producer.from_settings(load_settings(env)).submit_payment(
            account="acme", amount="5", redirect_url="https://shop.test/ok", reference_id="r-1"
        )
        done = doctor(env, "--json")
        assert done.returncode == 0, done.stdout
        found = by_check(done.stdout)
        assert {f["status"] for f in found.values()} == {OK}
        assert "steps scheduled 1" in found["queues"]["message"]
        assert all(f["fix"] == "" for f in found.values())


def test_doctor_with_redis_unreachable_fails_and_skips_what_needs_it(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    env = _env(tmp_path, f"redis://:pw-Kd93@127.0.0.1:{free_port()}/0", sandbox, SECRETS)
    done = doctor(env)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("FAIL  redis:") and "PAYPOLL_REDIS_URL" in lines[0]
    assert "pw-Kd93" not in done.stdout  # the URL's password is masked
    # persistence, maxmemory-policy, clock, accounts, queues, and the broker (the jobs' Redis).
    assert sum(line.startswith("SKIP") for line in lines) == 6
    assert any(line.startswith("SKIP  broker:") for line in lines)
    assert sandbox.stats()["clients"] == {} or all(
        c["total"] == 0 for c in sandbox.stats()["clients"].values()
    )


def test_a_long_overdue_step_fails_and_says_to_start_a_fleet(
    redis_url: str, redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    accounts = write_accounts_file(tmp_path / "a.toml", [("acme", "acme", SECRETS["acme"])])
    env = paypoll_env(
        redis_url=redis_url, api_url="http://127.0.0.1:1", accounts_file=accounts,
        key_prefix=key_prefix,
    )  # fmt: skip
    settings = load_settings(env)
    Producer.from_settings(settings).submit_payment(
        account="acme", amount="5", redirect_url="https://shop.test/ok", reference_id="late-1"
    )
    finding = check_queues(redis_client, settings)
    assert finding.status == OK and "overdue" in finding.message
    # Its create step fell due 5 minutes ago and nothing dispatched it.
    seconds, _ = redis_client.time()
    redis_client.zadd(Keys(key_prefix).due("acme", "create"), {"late-1": int(seconds) - 300})
    finding = check_queues(redis_client, settings)
    assert finding.status == FAIL and "workers alive 0" in finding.message
    assert "paypoll worker" in finding.fix
    assert float(finding.message.split("oldest due step ")[1].split()[0]) >= 299


def test_an_eviction_policy_without_maxmemory_is_a_warning() -> None:
    assert check_eviction({"maxmemory_policy": "noeviction", "maxmemory": 0}).status == OK
    assert check_eviction({"maxmemory_policy": "allkeys-lru", "maxmemory": 0}).status == WARN
    assert check_eviction({"maxmemory_policy": "volatile-lru", "maxmemory": 10}).status == FAIL
