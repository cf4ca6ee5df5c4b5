"""A private redis-server for tests: started on a free port, stopped at the end.

Tests that kill or restart Redis need a server of their own; everything else shares one private
server per test session. When ``redis-server`` is not installed, ``PAYPOLL_REDIS_URL`` may point at
a server the tests may use (they then only touch keys under a unique prefix, never FLUSHALL).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

HOW_TO_GET_REDIS = (
    "paypoll's tests need Redis: install redis-server (Debian/Ubuntu: apt-get install "
    "redis-server; macOS: brew install redis) so the tests can start a private one, or set "
    "PAYPOLL_REDIS_URL=redis://host:port/db to a server they may write keys to."
)


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
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(HOW_TO_GET_REDIS)
        self.binary = binary
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="paypoll-redis-")
        self.directory = directory or Path(self._tmp.name)  # type: ignore[union-attr]
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
