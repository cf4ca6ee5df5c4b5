"""Metrics across processes: two real spawned worker processes, one exporter, exact sums.

The children are fresh interpreters (multiprocessing "spawn", as the fleet starts them) that
import worker.metrics after PROMETHEUS_MULTIPROC_DIR is set; the exporter in this process serves
the sum of their files over HTTP.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.prometheus_server import scrape, value
from tests.redis_server import free_port
from tests.waiting import wait_until
from worker.errors import ConfigError
from worker.exporter import (
    MULTIPROC_ENV,
    Exporter,
    mark_process_dead,
    prepare_multiprocess_dir,
    start_exporter,
)

SPAWN = multiprocessing.get_context("spawn")


def _record(api_calls: int, terminal: int, started: Any, release: Any, crash: bool) -> None:
    """Child: record known counts, then hold a job open until released (or die inside it)."""
    from prometheus_client import values

    from worker import metrics

    # The fleet's premise: a spawned child imports prometheus-client in multiprocess mode.
    assert values.ValueClass.__name__ == "MmapedValue", "child is not in multiprocess mode"
    for _ in range(api_calls):
        metrics.record_api_call("acme", "get", "200", 0.02)
    metrics.record_api_call("acme", "create", "429", 0.01)
    for _ in range(terminal):
        metrics.record_transition("acme", "paid")
        metrics.record_terminal("acme", "paid", 42.0, 3)
    metrics.record_job("track", "ok", 0.05)
    job = metrics.job_in_progress("track")
    job.__enter__()
    started.set()
    if crash:
        os._exit(3)  # killed inside the job: its in-progress count stays in its file
    release.wait(30)
    job.__exit__(None, None, None)


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = prepare_multiprocess_dir(tmp_path / "metrics")
    # Spawned children inherit the environment at start; this process stays in its own mode.
    monkeypatch.setenv(MULTIPROC_ENV, str(path))
    return path


@pytest.fixture
def exporter(multiproc_dir: Path) -> Iterator[Exporter]:
    handle = start_exporter(host="127.0.0.1", port=0, multiprocess_dir=multiproc_dir)
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test() -> Iterator[None]:
    """A failed test leaves no child waiting on its release: each is killed at teardown."""
    yield
    for child in SPAWN.active_children():
        child.kill()
        child.join(10)


def _start(api_calls: int, terminal: int, *, crash: bool) -> tuple[Any, Any]:
    started, release = SPAWN.Event(), SPAWN.Event()
    process = SPAWN.Process(
        target=_record, args=(api_calls, terminal, started, release, crash), daemon=True
    )
    process.start()
    if not started.wait(30):
        raise AssertionError(
            f"child pid {process.pid} did not start recording in 30 s "
            f"(alive: {process.is_alive()}, exit code: {process.exitcode})"
        )
    return process, release


def test_counters_and_histograms_are_sums_of_both_processes(exporter: Exporter) -> None:
    first, release_first = _start(3, 2, crash=False)
    second, release_second = _start(5, 1, crash=False)
    release_first.set()
    release_second.set()
    for process in (first, second):
        process.join(30)
        assert process.exitcode == 0

    text = scrape(exporter.url)
    acme_get = {"account": "acme", "endpoint": "get", "outcome": "200"}
    assert value(text, "paypoll_api_calls_total", **acme_get) == 8
    assert value(text, "paypoll_api_call_seconds_count", **acme_get) == 8
    assert value(text, "paypoll_api_call_seconds_sum", **acme_get) == pytest.approx(0.16)
    assert value(text, "paypoll_api_call_seconds_bucket", le="0.025", **acme_get) == 8
    assert value(text, "paypoll_api_call_seconds_bucket", le="0.01", **acme_get) == 0
    assert value(text, "paypoll_api_rate_limited_total", account="acme") == 2
    assert value(text, "paypoll_payment_transitions_total", account="acme", state="paid") == 3
    assert value(text, "paypoll_payment_terminal_seconds_count", account="acme", state="paid") == 3
    assert value(text, "paypoll_payment_polls_sum", account="acme", state="paid") == 9
    assert value(text, "paypoll_jobs_total", actor="track", outcome="ok") == 4  # 2 + 2 exits
    # Both jobs ended normally: nothing in progress, even before anyone marks them dead.
    assert value(text, "paypoll_jobs_in_progress", actor="track") == 0

    # Counters of exited processes stay after mark_process_dead (counters never go down).
    mark_process_dead(first.pid)
    mark_process_dead(second.pid)
    assert value(scrape(exporter.url), "paypoll_api_calls_total", **acme_get) == 8


def test_a_dead_process_stops_counting_in_live_gauges(exporter: Exporter) -> None:
    crashed, _ = _start(1, 0, crash=True)
    running, release = _start(1, 0, crash=False)
    crashed.join(30)
    assert crashed.exitcode == 3

    # The crashed process never left its job: until the fleet marks it dead it still counts.
    assert value(scrape(exporter.url), "paypoll_jobs_in_progress", actor="track") == 2
    mark_process_dead(crashed.pid)
    text = scrape(exporter.url)
    assert value(text, "paypoll_jobs_in_progress", actor="track") == 1
    # Its counters are kept: the two processes' calls are both counted.
    acme_get = {"account": "acme", "endpoint": "get", "outcome": "200"}
    assert value(text, "paypoll_api_calls_total", **acme_get) == 2

    release.set()
    running.join(30)
    assert running.exitcode == 0
    mark_process_dead(running.pid)
    assert not value(scrape(exporter.url), "paypoll_jobs_in_progress", actor="track")


def test_prepare_multiprocess_dir_removes_only_metric_files(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"stale")
    (directory / "gauge_livesum_9.db").write_bytes(b"stale")
    (directory / "notes.txt").write_text("not ours")
    assert prepare_multiprocess_dir(directory) == directory.absolute()
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]
    # A missing directory is created.
    assert prepare_multiprocess_dir(tmp_path / "new" / "dir").is_dir()


def test_prepare_multiprocess_dir_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match=r"PROMETHEUS_MULTIPROC_DIR=.*cannot use it"):
        prepare_multiprocess_dir(target)


def test_port_taken_is_a_clear_config_error(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(ConfigError) as caught:
            start_exporter(host="127.0.0.1", port=port, multiprocess_dir=tmp_path)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "already in use" in message
    assert "PAYPOLL_METRICS_PORT" in message
    assert caught.value.__cause__ is None  # one line, no OSError traceback attached


def test_stop_releases_the_port(tmp_path: Path) -> None:
    exporter = start_exporter(host="127.0.0.1", port=0, multiprocess_dir=tmp_path)
    port = exporter.port
    assert port > 0
    assert "# HELP" not in scrape(exporter.url)  # an empty directory: nothing to serve yet
    exporter.stop()
    again = wait_until(
        lambda: _try_start(tmp_path, port), timeout=5, what="the port to be free after stop()"
    )
    again.stop()


def _try_start(directory: Path, port: int) -> Exporter | None:
    try:
        return start_exporter(host="127.0.0.1", port=port, multiprocess_dir=directory)
    except ConfigError:
        return None


def test_a_connection_gone_before_accept_does_not_hold_the_serving_loop(tmp_path: Path) -> None:
    """select() says a connection waits, but it is gone when the loop accepts (here another
    acceptor takes it first): the loop must not block in accept(), and stop() must end it."""
    exporter = start_exporter(host="127.0.0.1", port=0, multiprocess_dir=tmp_path)
    listener = exporter._server.socket
    stolen = 0
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", exporter.port), timeout=5):
            try:
                taken, _ = listener.accept()  # before the serving loop gets to it
            except BlockingIOError:
                continue  # the loop was first this time
            taken.close()
            stolen += 1
    assert stolen, "the test never got a connection before the serving loop"
    # The loop still serves...
    assert "# HELP" not in scrape(exporter.url)
    # ... and stops: no accept() left waiting for a client that will never come.
    started = time.monotonic()
    exporter.stop()
    assert time.monotonic() - started < 3
    assert not exporter._thread.is_alive()
