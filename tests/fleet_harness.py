"""Run real `paypoll worker` fleets for tests: environment, start, SIGKILL, stop, no orphans."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from tests.redis_server import free_port


def write_accounts_file(
    path: Path,
    accounts: Iterable[tuple[str, str, str]],
    *,
    rate: float | None = None,
    mode: int = 0o600,
) -> Path:
    """The TOML accounts file paypoll reads (PAYPOLL_ACCOUNTS_FILE): one table per
    (alias, client_id, client_secret), with ``rate`` when given; chmod ``mode``."""
    lines = []
    for alias, client_id, secret in accounts:
        lines += [
            f"[accounts.{alias}]",
            f'client_id = "{client_id}"',
            f'client_secret = "{secret}"',
        ]
        if rate is not None:
            lines.append(f"rate = {rate}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    path.chmod(mode)
    return path


def write_accounts(directory: Path, clients: Mapping[str, str], rate: float) -> Path:
    """An accounts file (chmod 600) naming each client_id as its own account alias."""
    return write_accounts_file(
        directory / "accounts.toml", ((c, c, secret) for c, secret in clients.items()), rate=rate
    )


def paypoll_env(
    *,
    redis_url: str,
    api_url: str,
    accounts_file: Path,
    key_prefix: str,
    **settings: object,
) -> dict[str, str]:
    """The environment of a paypoll process: this test's Redis keys, sandbox and accounts;
    ``settings`` are extra PAYPOLL_* values by field name (e.g. poll_first_delay=0.5)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYPOLL_")}
    env.update(
        PAYPOLL_REDIS_URL=redis_url,
        PAYPOLL_API_URL=api_url,
        PAYPOLL_ACCOUNTS_FILE=str(accounts_file),
        PAYPOLL_KEY_PREFIX=key_prefix,
        PAYPOLL_NAMESPACE=f"{key_prefix}-q",
        PAYPOLL_METRICS_PORT=str(free_port()),
        PAYPOLL_LOG_FORMAT="json",
        PAYPOLL_SWEEP_INTERVAL="0.1",
    )
    for name, value in settings.items():
        env["PAYPOLL_" + name.upper()] = str(value)
    return env


class RunningFleet:
    """One `paypoll worker` process (a supervisor and its worker processes)."""

    def __init__(self, env: Mapping[str, str], *, processes: int = 1, threads: int = 8) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="paypoll-fleet-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "worker",
                "--processes",
                str(processes),
                "--threads",
                str(threads),
            ],
            env=dict(env),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as a whole at the end
        )

    def output(self) -> str:
        """Everything the fleet logged so far."""
        return Path(self.log.name).read_text(errors="replace")

    def workers(self) -> list[int]:
        """PIDs of the worker processes that said they started and are still alive.

        (The supervisor has another child, multiprocessing's resource tracker: never it.)
        """
        pids = []
        for line in self.output().splitlines():
            if '"worker.started"' in line:
                pid = int(json.loads(line)["pid"])
                if Path(f"/proc/{pid}").exists():
                    pids.append(pid)
        return pids

    def kill_worker(self) -> int | None:
        """SIGKILL one worker process (the supervisor restarts it); its PID, or None."""
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                return pid
        return None

    def kill(self) -> None:
        """SIGKILL the whole fleet: supervisor and workers at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM the supervisor and wait; SIGKILL the group if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()
        return int(self.process.returncode)


@contextlib.contextmanager
def running_fleet(env: Mapping[str, str], **kwargs: int) -> Iterator[RunningFleet]:
    """A started fleet, stopped (and its process group killed) on exit."""
    fleet = RunningFleet(env, **kwargs)
    try:
        yield fleet
    finally:
        fleet.stop()
        with contextlib.suppress(OSError):
            os.unlink(fleet.log.name)


def wait_started(fleet: RunningFleet, workers: int, timeout: float = 30.0) -> None:
    """Wait until ``workers`` worker processes logged that they started."""
    deadline = time.monotonic() + timeout
    while fleet.output().count('"worker.started"') < workers:
        if fleet.process.poll() is not None:
            raise AssertionError(f"fleet exited early:\n{fleet.output()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"fleet did not start in {timeout}s:\n{fleet.output()[-3000:]}")
        time.sleep(0.05)
