"""Shared parts of the payment-pipeline benchmarks (polling.py, scale.py, throughput.py).

Each benchmark runs real parts on this machine: a private redis-server (never the shared one at
6379), the sandbox as a process on a free port, and the worker fleet (`paypoll worker`) as a
process whose worker children are measured from /proc. Nothing here is a test: these helpers
start things, measure them and write figures into docs/benchmarks.md.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import fleet_harness  # noqa: E402
from tests.redis_server import RedisServer, free_port, redis_binary  # noqa: E402
from tests.sandbox_fixture import RunningSandbox  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PIPELINE_HEADING = "## Payment pipeline"
PIPELINE_INTRO = (
    "Benchmarks of the whole pipeline (sweeper, dramatiq workers, limiter, store, API client) "
    "against the sandbox, each with a private redis-server, all on the same machine. Each "
    "subsection is written by its script with `--write-docs`."
)


# --- machine ----------------------------------------------------------------------------------
def _git(*args: str) -> str:
    """The output of ``git args`` in this repository, stripped ("" if git fails)."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def machine() -> str:
    """One line: cores, Python, Redis version, and the load average when the run started."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    chosen, _ = redis_binary()
    redis_version = ".".join(map(str, chosen.version or ())) if chosen else "none"
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "worker")
    return (
        f"code at {commit}{' + uncommitted changes in worker/' if dirty else ''}; "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, redis {redis_version}; "
        f"load average at start {' '.join(load)} (other engineers' work may be running)"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def window_max(times: Sequence[float], start: float, end: float) -> int:
    """The most timestamps in any window (t - 1 s, t] among ``times`` within [start, end]."""
    inside = sorted(t for t in times if start <= t <= end)
    best = low = 0
    for high, at in enumerate(inside):
        while inside[low] <= at - 1.0:
            low += 1
        best = max(best, high - low + 1)
    return best


# --- accounts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchAccount:
    name: str
    client_id: str
    secret: str


def make_accounts(count: int) -> list[BenchAccount]:
    """``count`` accounts named acc000..., with sandbox client ids and throwaway secrets."""
    return [
        BenchAccount(f"acc{i:03d}", f"client{i:03d}", f"secret-{i:03d}-bench") for i in range(count)
    ]


def write_accounts_file(accounts: Sequence[BenchAccount], rate: float, directory: Path) -> Path:
    """An accounts TOML (mode 600, as settings require) for PAYPOLL_ACCOUNTS_FILE."""
    entries = ((a.name, a.client_id, a.secret) for a in accounts)
    return fleet_harness.write_accounts_file(directory / "accounts.toml", entries, rate=rate)


def sandbox_clients(accounts: Sequence[BenchAccount]) -> list[str]:
    return [f"{a.client_id}:{a.secret}" for a in accounts]


# --- the stack --------------------------------------------------------------------------------
@dataclass
class Stack:
    """A private Redis, a sandbox and the environment a fleet needs to use both."""

    redis: RedisServer
    sandbox: RunningSandbox
    accounts: list[BenchAccount]
    workdir: Path
    env: dict[str, str]


@contextlib.contextmanager
def stack(
    accounts: Sequence[BenchAccount],
    *,
    account_rate: float,
    sandbox_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    **sandbox_kwargs: Any,
) -> Iterator[Stack]:
    """Start redis-server and the sandbox; yield the env for `paypoll worker`; stop both."""
    with tempfile.TemporaryDirectory(prefix="paypoll-bench-") as tmp:
        workdir = Path(tmp)
        server = RedisServer()
        server.start()
        try:
            sandbox = RunningSandbox(
                *sandbox_args, client=sandbox_clients(accounts), **sandbox_kwargs
            )
            try:
                full_env = {
                    **os.environ,
                    "PAYPOLL_REDIS_URL": server.url,
                    "PAYPOLL_API_URL": sandbox.url,
                    "PAYPOLL_ACCOUNTS_FILE": str(
                        write_accounts_file(accounts, account_rate, workdir)
                    ),
                    "PAYPOLL_KEY_PREFIX": "bench",
                    "PAYPOLL_NAMESPACE": "bench",
                    "PAYPOLL_LOG_FORMAT": "json",
                    "PAYPOLL_METRICS_PORT": str(free_port()),
                    **(env or {}),
                }
                full_env.pop("PAYPOLL_CLIENT_ID", None)
                full_env.pop("PAYPOLL_CLIENT_SECRET", None)
                yield Stack(server, sandbox, list(accounts), workdir, full_env)
            finally:
                sandbox.stop()
        finally:
            server.cleanup()


def settings_for(st: Stack) -> Any:
    """The Settings the fleet of ``st`` reads (for producers/stores in the benchmark)."""
    from worker.settings import load_settings

    return load_settings(st.env)


# --- the fleet --------------------------------------------------------------------------------
class FleetProcess(fleet_harness.RunningFleet):
    """`paypoll worker --processes N --threads M` on a Stack: tests/fleet_harness.py's
    RunningFleet, its output (JSON logs) in ``st.workdir / log_name``, metrics off unless
    ``metrics`` (then on the Stack's PAYPOLL_METRICS_PORT)."""

    def __init__(
        self,
        st: Stack,
        *,
        processes: int,
        threads: int,
        log_name: str = "fleet.log",
        metrics: bool = False,
    ):
        super().__init__(
            st.env,
            processes=processes,
            threads=threads,
            log_path=st.workdir / log_name,
            metrics=metrics,
        )

    def worker_pids(self) -> list[int]:
        """PIDs of the spawned worker processes (the resource tracker excluded)."""
        return self.children()

    def wait_workers(self, timeout: float = 30.0) -> list[int]:
        """Wait until all worker processes run (and have logged worker.started); their PIDs."""
        try:
            return self.wait_started(self.processes, timeout)
        except AssertionError as exc:
            raise RuntimeError(str(exc)) from None


def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Prometheus text from ``url``, summed per metric name and ``outcome`` label:
    ``{"paypoll_jobs_total{outcome=far_slot}": 12.0, "paypoll_jobs_total": 40.0, ...}``."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http URL we built)
        text = response.read().decode()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        outcome = re.search(r'outcome="([^"]*)"', name_labels)
        for key in (name, f"{name}{{outcome={outcome.group(1)}}}" if outcome else None):
            if key:
                sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids`` (their threads included), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def stolen_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests while this machine's vCPUs wanted to
    run (/proc/stat ``steal``, all CPUs); 0.0 where the kernel does not count it. On a shared
    host it is the noise no load average shows: a vCPU stolen between a rate-limit slot and its
    send makes the call late."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / CLK_TCK
    return 0.0


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (VmRSS, VmHWM); 0 when the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def sandbox_totals(stats: dict) -> tuple[int, int, int, dict[str, int]]:
    """From the sandbox's stats: (API calls answered, 429s, most accepted of one client in any
    second, calls by method and route), every client but the anonymous one."""
    calls = limited = max_1s = 0
    routes: collections.Counter[str] = collections.Counter()
    for client, entry in stats["clients"].items():
        if client == "(anonymous)":
            continue
        calls += entry["total"]
        limited += entry["rate_limited"]
        max_1s = max(max_1s, entry["max_accepted_in_1s"])
        for route, statuses in entry["requests"].items():
            routes[route.split(" ")[0] + " " + route.split(" ")[1].split("/")[1]] += sum(
                statuses.values()
            )
    return calls, limited, max_1s, dict(routes)


# --- talking to the sandbox directly (setup only) ----------------------------------------------
class SandboxConnection:
    """One keep-alive connection with a token of one client, for setting up payments fast."""

    def __init__(self, url: str, client_id: str, secret: str, path: str = "/payments/request"):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.path = path
        import base64

        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        answer = self._call(
            "POST",
            "/oauth/token",
            b"grant_type=client_credentials",
            {
                "Authorization": f"Basic {basic}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        self.headers = {
            "Authorization": f"Bearer {answer['access_token']}",
            "Content-Type": "application/json",
        }

    def call(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any]:
        """(status, parsed JSON body) of one request on the keep-alive connection."""
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None

    def _call(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Any:
        status, data = self.call(method, path, body, headers)
        if status != 200:
            raise RuntimeError(f"{method} {path}: {status} {str(data)[:200]}")
        return data

    def create(self, reference_id: str) -> dict[str, Any]:
        body = json.dumps(
            {
                "amount": "10",
                "currency": "USD",
                "redirect_url": "https://shop.example/thanks",
                "reference_id": reference_id,
            }
        ).encode()
        result: dict[str, Any] = self._call("POST", self.path, body, self.headers)
        return result

    def get(self, payment_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"{self.path}/{payment_id}", None, self.headers)
        return result

    def close(self) -> None:
        self.conn.close()


# --- docs -------------------------------------------------------------------------------------
def _markers(name: str) -> tuple[str, str]:
    return f"<!-- payment-pipeline:{name}:start -->", f"<!-- payment-pipeline:{name}:end -->"


def write_section(name: str, text: str) -> None:
    """Put ``text`` between this benchmark's markers under '## Payment pipeline' in
    docs/benchmarks.md, creating the heading and markers on first use; other sections stay
    as they are."""
    start, end = _markers(name)
    doc = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: block, doc)
    else:
        if PIPELINE_HEADING not in doc:
            doc = doc.rstrip() + f"\n\n{PIPELINE_HEADING}\n\n{PIPELINE_INTRO}\n"
        # Append after the last payment-pipeline block, or at the end of the pipeline heading's
        # part (before the next '## ' heading).
        head_at = doc.index(PIPELINE_HEADING)
        next_heading = doc.find("\n## ", head_at + len(PIPELINE_HEADING))
        insert_at = len(doc) if next_heading < 0 else next_heading + 1
        doc = (
            doc[:insert_at].rstrip()
            + f"\n\n{block}\n"
            + ("\n" + doc[insert_at:] if next_heading >= 0 else "")
        )
    DOCS.write_text(doc if doc.endswith("\n") else doc + "\n")
