"""config/prometheus.yml and alerts.yml pass promtool, and each alert is tested both ways."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.prometheus_server import require_prometheus

CONFIG = Path(__file__).resolve().parent.parent / "config"


def promtool(*args: str, cwd: Path = CONFIG) -> subprocess.CompletedProcess[str]:
    binary = require_prometheus("promtool")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_prometheus_config_is_valid() -> None:
    # rule_files are relative to the config's directory, so the real file is checked as is.
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _expectations() -> dict[str, set[str]]:
    """alertname -> {"firing", "silent"}: what the unit tests expect of it at some eval_time."""
    seen: dict[str, set[str]] = {}
    current = ""
    for line in (CONFIG / "alerts_test.yml").read_text().splitlines():
        if match := re.match(r"\s*alertname: (\w+)", line):
            current = match.group(1)
        elif match := re.match(r"\s*exp_alerts:\s*(\[\])?", line):
            seen.setdefault(current, set()).add("silent" if match.group(1) else "firing")
    return seen


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    declared = re.findall(r"^\s*- alert: (\w+)", (CONFIG / "alerts.yml").read_text(), re.M)
    assert len(declared) >= 6
    expectations = _expectations()
    for alert in declared:
        assert expectations.get(alert) == {"firing", "silent"}, alert


@pytest.mark.parametrize(
    ("original", "broken"),
    [
        ("paypoll_step_overdue_seconds) > 120", "paypoll_step_overdue_seconds) > 100000"),
        ("max(paypoll_workers_alive) == 0", "max(paypoll_workers_alive) < 0"),
        ("for: 10m\n", "for: 1m\n"),
    ],
)
def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path, original: str, broken: str) -> None:
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(CONFIG / name, tmp_path / name)
    rules = tmp_path / "alerts.yml"
    text = rules.read_text()
    assert original in text
    rules.write_text(text.replace(original, broken, 1))
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0, f"a rule with {broken!r} still passed the tests"
