"""The Grafana dashboard and its provisioning fit together, and name only metrics paypoll exports.

Grafana itself is not run here (no Debian package); tests/test_prometheus.py runs every query of
the dashboard against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

import worker.metrics  # noqa: F401  (registers paypoll's metrics in the default registry)
from tests.test_metrics_collectors import QUEUES, populate_store, redis_now
from worker.collectors import AccountLimitsCollector, StoreCollector
from worker.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "paypoll.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "paypoll.yml"
ALERTS = ROOT / "config" / "alerts.yml"
METRIC = re.compile(r"\bpaypoll_[a-z0-9_]+")


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _yaml_value(path: Path, key: str) -> str:
    """The value of ``key: value`` in a small flat provisioning file (no YAML parser installed)."""
    match = re.search(rf"^\s*-?\s*{key}:\s*(\S+)", path.read_text(), flags=re.MULTILINE)
    assert match, f"{path.name} has no {key}"
    return match.group(1)


def test_every_panel_uses_the_provisioned_datasource() -> None:
    uid = _yaml_value(DATASOURCES, "uid")
    assert _yaml_value(DATASOURCES, "type") == "prometheus"
    dashboard = _dashboard()
    assert dashboard["uid"] == "paypoll-overview"  # fixed, so links to it survive re-provisioning
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            assert target["expr"].strip()
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def test_layout_has_unique_ids_and_no_overlap() -> None:
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_the_issue_panels_are_there() -> None:
    exprs = " ".join(t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", []))
    for needed in [
        "paypoll_api_calls_total",  # request rate ...
        "paypoll_account_rate_limit",  # ... against the limit
        "paypoll_api_rate_limited_total",
        "histogram_quantile(0.99, sum by (endpoint, le) (rate(paypoll_api_call_seconds_bucket",
        "paypoll_limiter_wait_seconds_bucket",
        "paypoll_payments{",
        "paypoll_payment_terminal_seconds_bucket",
        "paypoll_payment_transitions_total",
        "paypoll_jobs_total",
        'outcome="error"',
        "paypoll_workers_alive",
        "paypoll_step_overdue_seconds",
        "paypoll_queue_depth",
    ]:
        assert needed in exprs, needed


def test_provisioning_loads_the_dashboard_directory() -> None:
    assert _yaml_value(PROVIDERS, "type") == "file"
    path = _yaml_value(PROVIDERS, "path")
    assert path == "/var/lib/grafana/dashboards"
    compose = ROOT / "docker-compose.yml"
    if compose.exists():  # the deployment must mount our folders where these files say
        text = compose.read_text()
        assert f"./grafana/dashboards:{path}" in text
        assert "./grafana/provisioning:/etc/grafana/provisioning" in text


@pytest.fixture
def exported_names(redis_client: redis.Redis, keys: Keys) -> set[str]:
    """Every sample name paypoll's exporter can serve (worker metrics and Redis collectors)."""
    populate_store(redis_client, keys, redis_now(redis_client))
    registry = CollectorRegistry()
    registry.register(StoreCollector(redis=redis_client, keys=keys, namespace="ns", queues=QUEUES))
    registry.register(AccountLimitsCollector({"acme": 5.0}))
    text = generate_latest(REGISTRY).decode() + generate_latest(registry).decode()
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (paypoll_\w+) (\w+)$", text, flags=re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_dashboard_and_alerts_name_only_exported_metrics(exported_names: set[str]) -> None:
    assert "paypoll_api_calls_total" in exported_names
    assert "paypoll_workers_alive" in exported_names
    dashboard_names = set(METRIC.findall(DASHBOARD.read_text()))
    alert_exprs = "\n".join(
        line for line in ALERTS.read_text().splitlines() if not line.strip().startswith("#")
    )
    alert_names = set(METRIC.findall(alert_exprs))
    assert dashboard_names - exported_names == set()
    assert alert_names - exported_names == set()
    assert len(dashboard_names) >= 20
