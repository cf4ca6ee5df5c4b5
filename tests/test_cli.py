"""The `paypoll` command as users run it: a real process, real Redis, output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.fleet_harness import paypoll_env, write_accounts
from worker.keys import Keys

SECRET = "cli-secret-value-123"


@pytest.fixture
def env(tmp_path: Path, redis_url: str, key_prefix: str) -> dict[str, str]:
    accounts = write_accounts(tmp_path, {"acme": SECRET, "globex": SECRET + "2"}, 5)
    return paypoll_env(
        redis_url=redis_url,
        api_url="http://127.0.0.1:9",
        accounts_file=accounts,
        key_prefix=key_prefix,
    )


def paypoll(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        input=stdin.decode() if stdin else None,
        timeout=60,
        check=False,
    )
    assert SECRET not in result.stdout + result.stderr
    return result


def queued(client: redis.Redis, keys: Keys) -> int:
    return sum(int(client.zcard(keys.due(a, "create"))) for a in ("acme", "globex"))


def submit_one(env: dict[str, str], ref: str, amount: str) -> subprocess.CompletedProcess[str]:
    """``paypoll submit`` of one payment of account acme."""
    return paypoll(
        env,
        "submit",
        "--account",
        "acme",
        "--amount",
        amount,
        "--redirect-url",
        "https://shop.test/ok",
        "--reference-id",
        ref,
    )


def test_submit_one_then_status_and_list(
    env: dict[str, str], redis_client: redis.Redis, keys: Keys
) -> None:
    done = submit_one(env, "order-7", "12.50")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "order-7"
    status = paypoll(env, "status", "order-7", "--json")
    record = json.loads(status.stdout)
    assert record["state"] == "queued" and record["account"] == "acme"
    for key in ("account", "reference_id", "payment_id", "state", "url", "polls", "last_error"):
        assert key in record
    listed = paypoll(env, "list", "--json", "--state", "queued")
    assert [json.loads(line)["reference_id"] for line in listed.stdout.splitlines()] == ["order-7"]
    assert queued(redis_client, keys) == 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--amount", "12.345"], "amount"),
        (["--amount", "0"], "amount"),
        (["--currency", "EUR"], "currency"),
        (["--redirect-url", "http://shop.test"], "redirect_url"),
        (["--account", "nobody"], "unknown account"),
        (["--reference-id", "has space"], "reference_id"),
    ],
)
def test_bad_submit_is_refused_clearly_and_queues_nothing(
    env: dict[str, str], redis_client: redis.Redis, keys: Keys, args: list[str], words: str
) -> None:
    base = {"--account": "acme", "--amount": "10", "--redirect-url": "https://shop.test/ok"}
    for name, value in zip(args[::2], args[1::2], strict=True):
        base[name] = value
    flat = [part for pair in base.items() for part in pair]
    result = paypoll(env, "submit", *flat)
    assert result.returncode == 1
    assert words in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert queued(redis_client, keys) == 0


def test_submit_file_reports_bad_rows_and_queues_the_good(
    env: dict[str, str], redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    rows = ["amount,redirect_url,reference_id"]
    rows += [f"{i + 1},https://shop.test/{i},f-{i}" for i in range(2000)]
    rows.insert(5, "abc,https://shop.test/x,bad-1")
    rows.insert(9, "5,ftp://shop.test/x,bad-2")
    path = tmp_path / "payments.csv"
    path.write_text("\n".join(rows) + "\n")
    result = paypoll(env, "submit", "--file", str(path), "--account", "globex", "--json")
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    errors = [line for line in lines if "error" in line]
    assert [(e["line"], e["field"]) for e in errors] == [(6, "amount"), (10, "redirect_url")]
    summary = lines[-1]["summary"]
    assert summary["submitted"] == 2000 and summary["refused"] == 2
    assert int(redis_client.zcard(keys.due("globex", "create"))) == 2000
    again = paypoll(env, "submit", "--file", str(path), "--account", "globex", "--json")
    assert json.loads(again.stdout.splitlines()[-1])["summary"]["already_submitted"] == 2000


def test_a_refused_row_names_every_problem_in_text_and_json(
    env: dict[str, str], redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    path = tmp_path / "payments.csv"
    path.write_text("account,amount,currency,redirect_url\nacme,-1,EUR,ftp://x\n")
    text = paypoll(env, "submit", "--file", str(path))
    assert text.returncode == 1
    refused = [line for line in text.stderr.splitlines() if line.startswith("refused")]
    assert len(refused) == 1 and refused[0].startswith("refused line 2: amount: ")
    assert "; currency: 'EUR' is not supported" in refused[0] and "; redirect_url: " in refused[0]
    as_json = paypoll(env, "submit", "--file", str(path), "--json")
    row = json.loads(as_json.stdout.splitlines()[0])
    assert [p["field"] for p in row["problems"]] == ["amount", "currency", "redirect_url"]
    assert all(p["reason"] for p in row["problems"]) and row["field"] == "amount"
    assert queued(redis_client, keys) == 0


def test_track_and_resolve(env: dict[str, str], redis_client: redis.Redis, keys: Keys) -> None:
    tracked = paypoll(env, "track", "--account", "acme", "pr_123")
    assert tracked.returncode == 0 and tracked.stdout.strip() == "track-pr_123"
    assert redis_client.zscore(keys.due("acme", "track"), "track-pr_123") is not None
    not_allowed = paypoll(env, "resolve", "track-pr_123", "--give-up")
    assert not_allowed.returncode == 1 and "pending" in not_allowed.stderr
    redis_client.hset(keys.payment("acme", "track-pr_123"), "state", "create_unknown")
    redis_client.smove(
        keys.by_state("acme", "pending"), keys.by_state("acme", "create_unknown"), "track-pr_123"
    )
    resolved = paypoll(env, "resolve", "track-pr_123", "--payment-id", "pr_123", "--json")
    assert json.loads(resolved.stdout) == {
        "reference_id": "track-pr_123",
        "from": "create_unknown",
        "to": "pending",
    }


def test_configuration_errors_are_one_line(env: dict[str, str], tmp_path: Path) -> None:
    bad = dict(env, PAYPOLL_READ_TIMEOUT="soon")
    result = paypoll(bad, "list")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "paypoll: configuration error: PAYPOLL_READ_TIMEOUT: expected a number, got 'soon'"
    )
    loose = tmp_path / "loose.toml"
    loose.write_text('[accounts.a]\nclient_id = "a"\nclient_secret = "x"\n')
    loose.chmod(0o644)
    result = paypoll(dict(env, PAYPOLL_ACCOUNTS_FILE=str(loose)), "list")
    assert result.returncode == 2 and "chmod 600" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text('[accounts.a]\nclient_id = "a"\n')
    broken.chmod(0o600)
    result = paypoll(dict(env, PAYPOLL_ACCOUNTS_FILE=str(broken)), "list")
    assert result.returncode == 2 and f"{broken}:1" in result.stderr
    assert "client_secret" in result.stderr


def test_every_command_and_option_is_explained() -> None:
    import argparse

    from worker.cli import COMMANDS, build_parser

    parser = build_parser()
    top = parser.format_help()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in COMMANDS:
        assert command in top
        sub = subparsers.choices[command]
        assert sub.format_help().startswith("usage: paypoll " + command)
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, (command, action.option_strings)


def test_resolve_recreate_and_give_up(
    env: dict[str, str], redis_client: redis.Redis, keys: Keys
) -> None:
    for ref in ("lost-1", "lost-2"):
        done = submit_one(env, ref, "5")
        assert done.returncode == 0, done.stderr
        redis_client.hset(
            keys.payment("acme", ref), mapping={"state": "create_unknown", "phase": "unknown"}
        )
        redis_client.smove(
            keys.by_state("acme", "queued"), keys.by_state("acme", "create_unknown"), ref
        )
        redis_client.zrem(keys.due("acme", "create"), ref)
    again = paypoll(env, "resolve", "lost-1", "--recreate")
    assert again.returncode == 0 and "create_unknown -> queued" in again.stdout
    assert redis_client.zscore(keys.due("acme", "create"), "lost-1") is not None
    assert redis_client.hget(keys.payment("acme", "lost-1"), "phase") == b""
    dropped = paypoll(env, "resolve", "lost-2", "--give-up")
    assert dropped.returncode == 0 and "create_unknown -> failed" in dropped.stdout
    record = json.loads(paypoll(env, "status", "lost-2", "--json").stdout)
    assert record["state"] == "failed" and record["last_error"] == "given up by an operator"
    assert redis_client.zscore(keys.due("acme", "create"), "lost-2") is None
