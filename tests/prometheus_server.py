"""A real Prometheus server for tests: its own port and storage, scraping the targets given.

``running_prometheus(targets=["127.0.0.1:9191"], rule_files=[...])`` starts ``prometheus`` with a
1 s scrape and evaluation interval and yields a :class:`PrometheusServer` whose ``query`` runs
PromQL through the HTTP API. Whatever runs the targets (an exporter in the test process today, a
``paypoll worker`` fleet later) is the caller's business: only the target list changes.

When the binaries are missing, :func:`require_prometheus` fails the test with how to install
them, unless ``PAYPOLL_SKIP_PROMETHEUS=1`` says to skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.redis_server import free_port

HOW_TO_GET_PROMETHEUS = (
    "the observability tests need Prometheus's `prometheus` and `promtool` binaries: "
    "apt-get install prometheus (Debian/Ubuntu; scripts/test does it when run as root), or put "
    "the release binaries from prometheus.io on PATH. Set PAYPOLL_SKIP_PROMETHEUS=1 to skip."
)


def require_prometheus(binary: str = "prometheus") -> str:
    """The path of ``binary`` (prometheus or promtool); fails the test loudly when missing."""
    path = shutil.which(binary)
    if path:
        return path
    if os.environ.get("PAYPOLL_SKIP_PROMETHEUS") == "1":
        pytest.skip(f"{binary} not installed and PAYPOLL_SKIP_PROMETHEUS=1")
    pytest.fail(f"{binary} not found. {HOW_TO_GET_PROMETHEUS}", pytrace=False)


class PrometheusServer:
    """A started Prometheus; ``url`` is its base URL."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raises AssertionError on an error."""
        body = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or a one-element list for a scalar) of ``expr`` evaluated now."""
        data = self.api("query", query=expr)
        if data["resultType"] in {"scalar", "string"}:
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> bool:
        """True when every active target has been scraped successfully."""
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def log(self) -> str:
        """Prometheus's own log so far (for failure messages)."""
        return self.log_path.read_text(errors="replace")[-4000:]


def write_config(
    path: Path,
    *,
    targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    job: str = "paypoll",
    interval: str = "1s",
) -> None:
    """Write a Prometheus config scraping ``targets`` (JSON, which Prometheus reads as YAML)."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(json.dumps(config, indent=2))


@contextlib.contextmanager
def running_prometheus(
    *,
    targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    interval: str = "1s",
    timeout: float = 30.0,
) -> Iterator[PrometheusServer]:
    """A Prometheus scraping ``targets`` every ``interval``; stopped and removed on exit."""
    binary = require_prometheus("prometheus")
    with tempfile.TemporaryDirectory(prefix="paypoll-prometheus-") as tmp:
        directory = Path(tmp)
        config = directory / "prometheus.yml"
        write_config(config, targets=targets, rule_files=rule_files, interval=interval)
        port = free_port()
        log_path = directory / "prometheus.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = PrometheusServer(f"http://127.0.0.1:{port}", process, log_path)
        try:
            _wait_ready(server, timeout)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wait_ready(server: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise AssertionError(f"prometheus exited at start:\n{server.log()}")
        try:
            if requests.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"prometheus not ready after {timeout}s:\n{server.log()}")
        time.sleep(0.05)


def scrape(url: str) -> str:
    """The text exposition served at ``url`` (fails on a non-200 answer)."""
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200, f"{url}: HTTP {resp.status_code}"
    return resp.text


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(exposition: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` (exact label set), or None when absent."""
    return samples(exposition).get((name, frozenset(labels.items())))
