"""The demo's moving parts: the sandbox and the worker fleet as subprocesses, and their settings.

Both are started with ``sys.executable`` (the same interpreter and install as the demo), each in
its own process group (:class:`~worker.demo.children.Child`). The fleet gets its settings the
way an operator would give them: ``PAYPOLL_*`` variables and an accounts file (chmod 600).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from worker.demo.children import Child
from worker.sandbox.config import CLIENTS_ENV
from worker.settings import ENV_PREFIX, Account, Secret, Settings

SANDBOX_START_TIMEOUT = 20.0  # seconds; interpreter start and imports dominate
FLEET_START_TIMEOUT = 40.0  # seconds until the fleet's metrics endpoint answers
LISTENING = "sandbox listening on "  # the sandbox's one stdout line (worker/sandbox/cli.py)

# A short payment lifecycle so a batch finishes in seconds, with some of every outcome.
PAY_AFTER = "1:6"
OUTCOMES = "paid=0.7,expired=0.15,cancelled=0.15"
LATENCY_MS = "5:40"  # answers take a few milliseconds, as a real API's would

# Fleet settings for a seconds-long demo (production defaults poll far less eagerly).
FLEET_ENV = {
    "POLL_FIRST_DELAY": "1",
    "POLL_FACTOR": "1.3",
    "POLL_MAX_DELAY": "2",
    "SWEEP_INTERVAL": "0.2",
    "TRACKING_TIMEOUT": "120",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "WARNING",
}


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs: accounts (with throwaway secrets), rate, fleet size, names."""

    prefix: str  # Redis key prefix and dramatiq namespace of this run
    accounts: tuple[Account, ...]
    rate: float
    processes: int
    threads: int
    seed: int

    @classmethod
    def make(
        cls, *, accounts: int, rate: float, processes: int, threads: int, seed: int | None = None
    ) -> DemoPlan:
        """A plan with ``accounts`` accounts named shop-a, shop-b, ... and random secrets."""
        names = [f"shop-{chr(ord('a') + i)}" if i < 26 else f"shop-{i}" for i in range(accounts)]
        return cls(
            prefix=f"paypoll-demo-{secrets.token_hex(4)}",
            accounts=tuple(
                Account(name, f"demo-{name}", Secret(secrets.token_urlsafe(16)), rate)
                for name in names
            ),
            rate=rate,
            processes=processes,
            threads=threads,
            seed=secrets.randbelow(1_000_000) if seed is None else seed,
        )

    def settings(self, *, redis_url: str, api_url: str) -> Settings:
        """The Settings the demo's own producer uses (same Redis, prefix and accounts)."""
        return Settings(
            redis_url=redis_url, api_url=api_url, key_prefix=self.prefix, namespace=self.prefix
        ).with_accounts(*self.accounts)


def write_accounts_file(path: Path, accounts: tuple[Account, ...]) -> Path:
    """Write ``accounts`` as the TOML accounts file, readable by its owner only."""
    lines = []
    for account in accounts:
        lines += [
            f"[accounts.{account.name}]",
            f'client_id = "{account.client_id}"',
            f'client_secret = "{account.client_secret.reveal()}"',
            f"rate = {account.rate:g}",
            "",
        ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join(lines))
    os.chmod(path, 0o600)
    return path


def start_sandbox(plan: DemoPlan, workdir: Path, stack: contextlib.ExitStack) -> tuple[Child, str]:
    """Start the sandbox on a free loopback port (its stop registered on ``stack`` at once);
    returns it and its base URL."""
    argv = [sys.executable, "-m", "worker.sandbox", "--exit-with-parent", "--port", "0"]
    # The secrets go in the child's environment, not its command line (which `ps` shows).
    env = _base_env()
    env[CLIENTS_ENV] = " ".join(
        f"{account.client_id}:{account.client_secret.reveal()}" for account in plan.accounts
    )
    argv += [
        "--rate",
        f"{plan.rate:g}",
        "--pay-after",
        PAY_AFTER,
        "--outcomes",
        OUTCOMES,
        "--latency",
        LATENCY_MS,
        "--seed",
        str(plan.seed),
    ]
    child = Child(
        "sandbox", argv, log_path=workdir / "sandbox.log", stdout=subprocess.PIPE, env=env
    )
    stack.callback(child.stop)
    assert child.process.stdout is not None
    line = _read_line(child.process.stdout, SANDBOX_START_TIMEOUT)
    if not line.startswith(LISTENING):
        tail = child.log_tail()
        raise RuntimeError(f"the sandbox did not start: {line or tail or 'no output'}")
    return child, line[len(LISTENING) :].strip()


def _read_line(stream: object, timeout: float) -> str:
    """The first line of ``stream`` (a pipe), or '' after ``timeout`` seconds or at EOF."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)  # type: ignore[arg-type]
    try:
        if not selector.select(timeout):
            return ""
        return stream.readline().decode("utf-8", "replace")  # type: ignore[attr-defined,no-any-return]
    finally:
        selector.close()


def _base_env() -> dict[str, str]:
    """The demo's environment without any PAYPOLL_* setting of the user's."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def fleet_env(
    plan: DemoPlan, *, redis_url: str, api_url: str, accounts_file: Path, metrics_port: int
) -> dict[str, str]:
    """The environment of the demo's ``paypoll worker``: only the demo's PAYPOLL_* settings."""
    env = _base_env()
    settings = {
        "REDIS_URL": redis_url,
        "API_URL": api_url,
        "KEY_PREFIX": plan.prefix,
        "NAMESPACE": plan.prefix,
        "ACCOUNTS_FILE": str(accounts_file),
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(metrics_port),
        **FLEET_ENV,
    }
    env.update({ENV_PREFIX + name: value for name, value in settings.items()})
    return env


def start_fleet(
    plan: DemoPlan,
    env: dict[str, str],
    workdir: Path,
    metrics_url: str,
    stack: contextlib.ExitStack,
) -> Child:
    """Start ``paypoll worker`` (its stop registered on ``stack`` at once) and wait until its
    metrics endpoint answers."""
    argv = [
        sys.executable,
        "-m",
        "worker.cli",
        "worker",
        "--processes",
        str(plan.processes),
        "--threads",
        str(plan.threads),
    ]
    child = Child("worker fleet", argv, env=env, log_path=workdir / "worker.log")
    stack.callback(child.stop)
    deadline = time.monotonic() + FLEET_START_TIMEOUT
    while True:
        if not child.alive():
            raise RuntimeError(f"paypoll worker exited at start:\n{child.log_tail()}")
        try:
            if requests.get(metrics_url, timeout=1).status_code == 200:
                return child
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"paypoll worker did not serve {metrics_url} in time")
        time.sleep(0.1)
