"""Security (issue 7, invariant 6): secrets stay secret; Redis auth and TLS work; metrics are
private by default; an accounts file others can read is refused.

The chaos suite (tests/test_chaos.py) scans every log line, the metrics, the events stream and
CLI output of a violent run for the client secrets and every access token; the tests here cover
what that run does not: a password and TLS on Redis, wrong credentials, the metrics bind address
and the accounts file's permissions.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.chaos_harness import base_env, make_accounts, run_cli, write_accounts
from tests.fleet_harness import RunningFleet
from tests.rabbitmq_server import RabbitMQ
from tests.redis_server import free_port, redis_server_binary
from tests.sandbox_fixture import RunningSandbox
from tests.waiting import wait_until
from worker import defaults
from worker.errors import ConfigError
from worker.exporter import start_exporter
from worker.keys import Keys
from worker.settings import load_accounts_file, load_settings

PASSWORD = "redis-pw-Zq8sK2mX91"

needs_redis = pytest.mark.skipif(redis_server_binary() is None, reason="needs redis-server >= 7.0")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


# --- accounts file ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_accounts_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    accounts = make_accounts(1)
    path = write_accounts(tmp_path / "accounts.toml", accounts, mode=mode)
    with pytest.raises(ConfigError, match="chmod 600") as caught:
        load_accounts_file(path)
    assert accounts[0].client_secret not in str(caught.value)
    # The CLI says the same in one line, without the secret, and exits 2.
    code, output = run_cli(
        base_env({"PAYPOLL_ACCOUNTS_FILE": str(path), "PAYPOLL_REDIS_URL": "redis://127.0.0.1:1"}),
        "list",
        "--counts",
    )
    assert code == 2
    assert "chmod 600" in output
    assert accounts[0].client_secret not in output


def test_accounts_file_private_is_accepted_and_secret_masked(tmp_path: Path) -> None:
    accounts = make_accounts(2)
    path = write_accounts(tmp_path / "accounts.toml", accounts)
    loaded = load_accounts_file(path)
    assert sorted(loaded) == ["acct0", "acct1"]
    assert loaded["acct0"].client_secret.reveal() == accounts[0].client_secret
    settings = load_settings({"PAYPOLL_ACCOUNTS_FILE": str(path)})
    for text in (repr(settings), str(settings), repr(loaded["acct0"])):
        assert accounts[0].client_secret not in text
        assert accounts[1].client_secret not in text


# --- metrics bind address -----------------------------------------------------------------------


def _other_local_addresses() -> list[str]:
    """Addresses of this host other than 127.0.0.1: another loopback one, and the host's own."""
    found = ["127.0.0.2"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent by a UDP connect
            address = probe.getsockname()[0]
        except OSError:
            address = ""
    if address and not address.startswith("127."):
        found.append(address)
    return found


def test_metrics_bind_loopback_by_default() -> None:
    settings = load_settings({})
    assert settings.metrics_host == defaults.METRICS_HOST == "127.0.0.1"
    exporter = start_exporter(host=settings.metrics_host, port=0)
    try:
        response = requests.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5)
        assert response.status_code == 200
        for address in _other_local_addresses():
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://{address}:{exporter.port}/metrics", timeout=2)
    finally:
        exporter.stop()


# --- Redis with a password and TLS, end to end ----------------------------------------------------


def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost/127.0.0.1, made with openssl."""
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run(*["genrsa", "-out", str(ca_key), "2048"])
    run("req", "-x509", "-new", "-key", str(ca_key), "-days", "2", "-subj", "/CN=paypoll-test-ca",
        "-out", str(ca_crt))  # fmt: skip
    run(*["genrsa", "-out", str(key), "2048"])
    run("req", "-new", "-key", str(key), "-subj", "/CN=localhost", "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    return ca_crt, crt, key


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A redis-server speaking only TLS, with a password; (rediss:// URL, CA file)."""
    ca, crt, key = _make_certs(tmp_path)
    port = free_port()
    binary = redis_server_binary()
    assert binary is not None  # needs_redis
    process = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(crt),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            PASSWORD,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        if process.poll() is not None:
            err = process.stderr.read().decode() if process.stderr else ""
            pytest.fail(f"redis-server with TLS did not start (TLS not compiled in?): {err}")
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait_until(answers, timeout=15, what="TLS redis-server")
    client.close()
    yield url, ca
    process.terminate()
    process.wait(10)
    if process.stderr:
        process.stderr.close()


@needs_redis
@needs_openssl
@pytest.mark.timeout(120)
def test_fleet_over_tls_redis_with_password_and_a_refused_account(
    tmp_path: Path, tls_redis: tuple[str, Path]
) -> None:
    url, _ = tls_redis
    good, bad = make_accounts(2)
    accounts_file = write_accounts(tmp_path / "accounts.toml", [good, bad])
    # The sandbox knows acct1's client_id with ANOTHER secret: its token call gets 403.
    sandbox = RunningSandbox(
        client=[f"{good.client_id}:{good.client_secret}", f"{bad.client_id}:other-secret-1234"],
        pay_after="0.2:0.5",
    )
    env = base_env(
        {
            "PAYPOLL_REDIS_URL": url,
            "PAYPOLL_API_URL": sandbox.url,
            "PAYPOLL_ACCOUNTS_FILE": str(accounts_file),
            "PAYPOLL_LOG_FORMAT": "json",
            "PAYPOLL_POLL_FIRST_DELAY": "0.5",
            "PAYPOLL_SWEEP_INTERVAL": "0.25",
        }
    )
    fleet = RunningFleet(env, threads=4, log_path=tmp_path / "fleet.log")
    try:
        fleet.wait_ready(timeout=60)
        outputs = []
        for i, acct in enumerate([good, good, good, bad]):
            code, out = run_cli(
                env,
                "submit",
                "--account", acct.name,
                "--amount", "10",
                "--redirect-url", "https://shop.example/ok",
                "--reference-id", f"tls-{i}",
            )  # fmt: skip
            assert code == 0, out
            outputs.append(out)

        def good_ones_final() -> bool:
            code, out = run_cli(env, "list", "--account", good.name, "--json")
            outputs.append(out)
            states = [json.loads(line)["state"] for line in out.splitlines() if line.strip()]
            return (
                code == 0 and len(states) == 3 and set(states) <= {"paid", "expired", "cancelled"}
            )

        wait_until(good_ones_final, timeout=60, interval=0.5, what="3 payments final over TLS")
        wait_until(
            lambda: "account.credentials_refused" in fleet.log(),
            timeout=30,
            what="the refused account to be reported",
        )
        code, out = run_cli(env, "status", "tls-3", "--account", bad.name, "--json")
        outputs.append(out)
        assert code == 0, out
        assert json.loads(out)["state"] in {"queued", "creating"}  # kept, not lost
        token = redis.Redis.from_url(url).get(Keys(defaults.KEY_PREFIX).token(good.name))
        metrics = requests.get(fleet.metrics_url, timeout=5).text
    finally:
        fleet.stop(timeout=20)
        sandbox.stop()
    log = fleet.log()
    assert "worker.started" in log
    texts = {"fleet log": log, "CLI output": "\n".join(outputs), "metrics": metrics}
    needles = [PASSWORD, good.client_secret, bad.client_secret]
    if token:
        needles.append(token.decode())
    for place, text in texts.items():
        for needle in needles:
            assert needle not in text, f"a secret in the {place}"


@needs_redis
def test_wrong_redis_password_is_a_clear_error_without_the_password(tmp_path: Path) -> None:
    from tests.redis_server import running_redis

    with running_redis(password=PASSWORD) as server:
        wrong = "not-the-pw-77x"
        env = base_env({"PAYPOLL_REDIS_URL": f"redis://:{wrong}@127.0.0.1:{server.port}/0"})
        code, output = run_cli(env, "list", "--counts")
        assert code != 0
        assert output.strip(), "no error message"
        assert wrong not in output and PASSWORD not in output
        assert "Traceback" not in output, output
        env = base_env({"PAYPOLL_REDIS_URL": server.url})
        code, output = run_cli(env, "list", "--counts")
        assert code == 0, output
        assert PASSWORD not in output


# --- RabbitMQ with a password (issue 14) ---------------------------------------------------------
BROKER_PASSWORD = "mq-pw-Vt83qLz0Ww"


@needs_redis
@pytest.mark.timeout(120)
def test_the_broker_password_stays_out_of_logs_metrics_and_cli_output(
    tmp_path: Path, redis_url: str, rabbitmq: RabbitMQ
) -> None:
    (account,) = make_accounts(1)
    sandbox = RunningSandbox(
        client=[f"{account.client_id}:{account.client_secret}"], pay_after="0.2:0.5"
    )
    outputs = []
    with rabbitmq.vhost() as vhost, rabbitmq.user(vhost, BROKER_PASSWORD) as broker_url:
        env = base_env(
            {
                "PAYPOLL_REDIS_URL": redis_url,
                "PAYPOLL_BROKER_URL": broker_url,
                "PAYPOLL_KEY_PREFIX": f"pp-mq-{vhost}",
                "PAYPOLL_API_URL": sandbox.url,
                "PAYPOLL_ACCOUNTS_FILE": str(write_accounts(tmp_path / "a.toml", [account])),
                "PAYPOLL_LOG_FORMAT": "json",
                "PAYPOLL_POLL_FIRST_DELAY": "0.5",
                "PAYPOLL_SWEEP_INTERVAL": "0.25",
                "PAYPOLL_METRICS_PORT": str(free_port()),
            }
        )
        fleet = RunningFleet(env, threads=4, log_path=tmp_path / "fleet.log")
        try:
            fleet.wait_ready(timeout=60)
            for i in range(3):
                code, out = run_cli(
                    env,
                    "submit",
                    "--account", account.name,
                    "--amount", "10",
                    "--redirect-url", "https://shop.example/ok",
                    "--reference-id", f"mq-{i}",
                )  # fmt: skip
                assert code == 0, out
                outputs.append(out)

            def final() -> bool:
                code, out = run_cli(env, "list", "--json")
                outputs.append(out)
                states = {json.loads(line)["state"] for line in out.splitlines() if line}
                return code == 0 and states <= {"paid", "expired", "cancelled"} and bool(states)

            wait_until(final, timeout=60, interval=0.5, what="3 payments final via RabbitMQ")
            metrics = requests.get(fleet.metrics_url, timeout=5).text
            assert 'paypoll_queue_depth{queue="paypoll-track"}' in metrics
            code, out = run_cli(env, "top", "--once", "--json", "--interval", "0.2")
            assert code == 0 and "paypoll-track" in json.loads(out)["queues"], out
            outputs.append(out)
            for command in (("doctor",), ("doctor", "--json")):
                outputs.append(run_cli(env, *command)[1])
            # A wrong password: refused in one line that names the field, the password masked.
            wrong = {**env, "PAYPOLL_BROKER_URL": broker_url.replace(BROKER_PASSWORD, "bad-Qx9")}
            code, out = run_cli(wrong, "worker", "--processes", "1")
            assert code == 2 and "PAYPOLL_BROKER_URL" in out and "login refused" in out, out
            assert "bad-Qx9" not in out
            outputs.append(out)
        finally:
            fleet.stop(timeout=20)
            sandbox.stop()
    texts = {"fleet log": fleet.log(), "CLI output": "\n".join(outputs), "metrics": metrics}
    assert "***@127.0.0.1" in texts["CLI output"]  # doctor names the broker, password masked
    for place, text in texts.items():
        for needle in (BROKER_PASSWORD, account.client_secret):
            assert needle not in text, f"a secret in the {place}"
