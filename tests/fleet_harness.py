"""Run real `paypoll worker` fleets: environment, start, SIGKILL, stop, no orphans.

The one fleet-starting helper of the tests, the chaos runs (tests/chaos_harness.py) and the
benchmarks (benchmarks/common.py's FleetProcess is a thin subclass of :class:`RunningFleet`).
"""

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
from typing import Any

import requests

from tests.redis_server import free_port
from tests.waiting import wait_until


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


ROOT = Path(__file__).resolve().parent.parent


def paypoll_command() -> list[str]:
    """The ``paypoll`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "paypoll"
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]


def _ppid_and_cmdline(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: ppid is the 2nd field after it.
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    return ppid, cmdline


def worker_children(pid: int) -> list[int]:
    """Pids of the spawned worker processes of fleet ``pid`` (not multiprocessing helpers such
    as the resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        info = _ppid_and_cmdline(int(entry.name))
        if info and info[0] == pid and "spawn_main" in info[1]:
            found.append(int(entry.name))
    return sorted(found)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class RunningFleet:
    """One `paypoll worker` process (a supervisor and its worker processes), for tests, the
    chaos runs and the benchmarks alike.

    Its output (JSON logs) goes to ``log_path`` (appended; default a temp file, removed by
    :func:`running_fleet`). ``metrics_port`` defaults to the env's ``PAYPOLL_METRICS_PORT``, else
    a free one; ``metrics=False`` runs it with ``--no-metrics``; ``metrics_dir`` sets
    ``PAYPOLL_METRICS_DIR``. The fleet runs in its own session, so :meth:`kill` and
    :meth:`stop` can reach every process it started.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        processes: int = 1,
        threads: int = 8,
        log_path: Path | None = None,
        metrics: bool = True,
        metrics_port: int | None = None,
        metrics_dir: Path | None = None,
    ) -> None:
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="paypoll-fleet-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.processes = processes
        self.metrics_port = metrics_port or int(env.get("PAYPOLL_METRICS_PORT") or free_port())
        full_env = {**env, "PAYPOLL_METRICS_PORT": str(self.metrics_port)}
        if metrics_dir is not None:
            full_env["PAYPOLL_METRICS_DIR"] = str(metrics_dir)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [
                *paypoll_command(),
                "worker",
                "--processes",
                str(processes),
                "--threads",
                str(threads),
                *([] if metrics else ["--no-metrics"]),
            ],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,  # its own process group: killed as a whole at the end
        )
        self.pid = self.process.pid

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def output(self) -> str:
        """Everything the fleet logged so far."""
        return self.log_path.read_text(errors="replace")

    log = output

    def children(self) -> list[int]:
        """PIDs of the worker processes running now (never the resource tracker)."""
        return worker_children(self.pid)

    def workers(self) -> list[int]:
        """PIDs of the worker processes that said they started and are still alive."""
        pids = []
        for line in self.output().splitlines():
            if '"worker.started"' in line:
                pid = int(json.loads(line)["pid"])
                if pid_alive(pid):
                    pids.append(pid)
        return pids

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"fleet exited with {self.process.returncode}:\n{self.output()[-3000:]}"
            )

    def wait_started(self, workers: int | None = None, timeout: float = 30.0) -> list[int]:
        """Wait until ``workers`` (default: all) worker processes logged that they started and
        run; their PIDs."""
        want = self.processes if workers is None else workers
        deadline = time.monotonic() + timeout
        while True:
            self._check_running()
            started = self.output().count('"worker.started"')
            pids = self.children()
            if started >= want and len(pids) >= want:
                return pids
            if time.monotonic() > deadline:
                raise AssertionError(f"fleet did not start in {timeout}s:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 30.0) -> int:
        """Wait until a worker process runs and the metrics endpoint answers; its PID."""

        def ready() -> int | None:
            self._check_running()
            kids = self.children()
            if not kids:
                return None
            try:
                requests.get(self.metrics_url, timeout=1).raise_for_status()
            except requests.RequestException:
                return None
            return kids[0]

        return wait_until(ready, timeout=timeout, interval=0.1, what="fleet ready")

    def kill_worker(self) -> int | None:
        """SIGKILL one worker process (the supervisor restarts it); its PID, or None."""
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                return pid
        return None

    def kill(self, *, supervisor_only: bool = False) -> None:
        """SIGKILL the whole fleet at once, or with ``supervisor_only`` the supervisor alone (its
        worker processes must then die by themselves: PDEATHSIG, which the chaos runs check)."""
        with contextlib.suppress(ProcessLookupError):
            if supervisor_only:
                self.process.kill()
            else:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM the supervisor and wait; SIGKILL the group if it does not stop in time, and
        whatever of the group is left once it has (nothing, when the fleet stops cleanly)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()
        return int(self.process.returncode)


@contextlib.contextmanager
def running_fleet(env: Mapping[str, str], **kwargs: Any) -> Iterator[RunningFleet]:
    """A started fleet, stopped (and its process group killed) on exit."""
    fleet = RunningFleet(env, **kwargs)
    try:
        yield fleet
    finally:
        fleet.stop()
        if "log_path" not in kwargs:
            with contextlib.suppress(OSError):
                fleet.log_path.unlink()


def wait_started(fleet: RunningFleet, workers: int, timeout: float = 30.0) -> None:
    """Wait until ``workers`` worker processes logged that they started (and run)."""
    fleet.wait_started(workers, timeout)
