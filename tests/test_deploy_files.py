"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml,
Procfile, config examples, and the README's configuration reference.

No Docker engine runs the tests, so the files are read and checked for what would break a
build or a deployment: a COPY of a missing or ignored file, a root user, a command that names
no real console script, a scrape target that is no compose service, a setting missing from the
docs. docker-compose.yml is kept to a plain YAML subset read by :func:`read_yaml_subset` (PyYAML
is not a dependency).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from worker.cli import COMMANDS
from worker.settings import ENV_HELP, Settings, env_name, load_accounts_file, load_settings

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT_SETTINGS = ("CLIENT_ID", "CLIENT_SECRET", "RATE", "ACCOUNTS_FILE")


# --- a reader for the YAML subset docker-compose.yml keeps to -----------------------------------
def _strip_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if char in "\"'" and quote is None:
            quote = char
        elif char == quote:
            quote = None
        elif char == "#" and quote is None and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)  # flow lists are written JSON-style
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'") and text.endswith("'"):
        return text[1:-1].replace("''", "'")
    return text


def read_yaml_subset(text: str) -> Any:
    """Block mappings (``key: value`` / ``key:`` + indented block), block lists of scalars
    (``- value``), JSON-style flow lists, quoted and plain scalars (kept as strings).
    Anything else (anchors, multi-line strings, ``- key: value`` items) raises ValueError."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw)
        if not line.strip():
            continue
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise ValueError(f"line {number}: tab indentation")
        if re.match(r"^(?:- |[\w\".-]+:\s+)?[&*!|>{%@`]", line.strip()):
            raise ValueError(f"line {number}: outside the subset: {raw!r}")
        lines.append((number, len(line) - len(line.lstrip()), line.strip()))

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][2].startswith("- "):
            items = []
            while i < len(lines) and lines[i][1] == indent and lines[i][2].startswith("- "):
                item = lines[i][2][2:]
                if re.match(r"^[\w.-]+:(\s|$)", item):
                    raise ValueError(f"line {lines[i][0]}: '- key: value' is outside the subset")
                items.append(_scalar(item))
                i += 1
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][1] == indent:
            number, _, content = lines[i]
            match = re.match(r'^("[^"]+"|[\w.-]+):(?:\s+(.*))?$', content)
            if not match:
                raise ValueError(f"line {number}: expected 'key: value', got {content!r}")
            key = match.group(1).strip('"')
            if key in mapping:
                raise ValueError(f"line {number}: duplicate key {key!r}")
            i += 1
            if match.group(2) is not None:
                mapping[key] = _scalar(match.group(2))
            elif i < len(lines) and lines[i][1] > indent:
                mapping[key], i = block(i, lines[i][1])
            else:
                mapping[key] = None
        if i < len(lines) and lines[i][1] > indent:
            raise ValueError(f"line {lines[i][0]}: unexpected indentation")
        return mapping, i

    value, end = block(0, lines[0][1])
    if end != len(lines):
        raise ValueError(f"line {lines[end][0]}: unexpected dedent")
    return value


def test_yaml_subset_reader_reads_and_refuses() -> None:
    text = 'a:\n  b: "x # y"  # c\n  c: [1, "two"]\n  d:\n    - p\n    - "q"\n  e:\nf: plain\n'
    assert read_yaml_subset(text) == {
        "a": {"b": "x # y", "c": [1, "two"], "d": ["p", "q"], "e": None},
        "f": "plain",
    }
    for bad in ("a: &x 1\n", "a:\n  - b: 1\n", "a: 1\na: 2\n", "a: |\n  text\n"):
        with pytest.raises(ValueError, match="line"):
            read_yaml_subset(bad)


# --- docker-compose.yml ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = read_yaml_subset((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_has_the_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "sandbox", "worker", "prometheus", "grafana"}
    assert set(compose["volumes"]) >= {"redis-data", "prometheus-data"}


def test_compose_redis_persists_with_aof(compose: dict[str, Any]) -> None:
    redis_service = compose["services"]["redis"]
    command = redis_service["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-data:/data" in redis_service["volumes"]


def test_compose_worker_scales(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    # --scale worker=N needs no fixed name and no host port.
    assert "container_name" not in worker
    assert "ports" not in worker
    env = worker["environment"]
    assert env["PAYPOLL_REDIS_URL"].startswith("redis://redis:")
    assert env["PAYPOLL_API_URL"] == "http://sandbox:8080"
    load_settings(env)  # the worker's settings are valid


def test_compose_commands_name_real_console_scripts(compose: dict[str, Any]) -> None:
    for name in ("worker", "sandbox"):
        service = compose["services"][name]
        assert service["image"] == "paypoll:local"
        command = service["command"]
        assert command[0] == "paypoll" and command[1] in COMMANDS, command
        options = [c for c in command[2:] if c.startswith("--")]
        help_text = _paypoll_help(command[1])
        for option in options:
            assert option in help_text, f"{name}: paypoll {command[1]} has no {option}"
    assert "0.0.0.0" in compose["services"]["sandbox"]["command"]
    for name in ("redis", "prometheus", "grafana"):
        image = compose["services"][name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"


def test_compose_mounts_exist_and_match_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    prometheus = (ROOT / "config/prometheus.yml").read_text()
    assert "/etc/prometheus" in " ".join(compose["services"]["prometheus"]["volumes"])
    assert "rule_files" in prometheus and (ROOT / "config/alerts.yml").is_file()
    # The scrape target is the worker service on its metrics port.
    # Every scaled replica is found through Docker's DNS (dns_sd_configs on the service name).
    names = re.findall(r'names: \["([\w.-]+)"\]', prometheus)
    ports = re.findall(r"port: (\d+)", prometheus)
    targets = [(name, port) for name in names for port in ports]
    port = compose["services"]["worker"]["environment"]["PAYPOLL_METRICS_PORT"]
    assert ("worker", port) in targets, targets
    datasource = (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    assert "http://prometheus:9090" in datasource
    assert "prometheus" in compose["services"]
    assert list((ROOT / "grafana/dashboards").glob("*.json"))


def _paypoll_help(command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


# --- Dockerfile and .dockerignore ------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


def _ignored(path: str) -> bool:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for pattern in patterns for prefix in prefixes)


def test_dockerfile_copies_only_existing_unignored_files() -> None:
    copies = [args for ins, args in _dockerfile() if ins == "COPY" and "--from" not in args]
    assert copies
    for args in copies:
        sources = shlex.split(args)[:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"
    assert _ignored(".venv") and _ignored(".git") and _ignored("worker/__pycache__")


def test_dockerfile_is_multi_stage_slim_non_root_with_healthcheck() -> None:
    instructions = _dockerfile()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) == 2 and all(f.startswith("python:3.11-slim") for f in froms)
    final_start = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    final = instructions[final_start:]
    assert any(ins == "COPY" and "--from=builder" in args for ins, args in final)
    # No compiler or build tooling installed in the final stage.
    runs = " ".join(args for ins, args in final if ins == "RUN")
    assert "apt-get install" not in runs and "gcc" not in runs and "build-essential" not in runs
    user = [args for ins, args in final if ins == "USER"]
    assert user and user[-1] not in {"root", "0"}
    env = " ".join(args for ins, args in final if ins == "ENV")
    assert "PAYPOLL_METRICS_HOST=0.0.0.0" in env
    healthcheck = [args for ins, args in final if ins == "HEALTHCHECK"]
    assert healthcheck and "/metrics" in healthcheck[0]
    # The healthcheck's Python is valid.
    exec_form = json.loads(healthcheck[0][healthcheck[0].index("CMD") + 3 :].strip())
    assert exec_form[:2] == ["python", "-c"]
    compile(exec_form[2], "<healthcheck>", "exec")
    cmd = [args for ins, args in final if ins == "CMD"]
    assert json.loads(cmd[-1]) == ["paypoll", "worker"]


def test_wheel_ships_the_lua_scripts(tmp_path: Path) -> None:
    """What the Dockerfile's builder stage does: ``pip wheel .`` holds every .lua file."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "worker", source / "worker", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("paypoll-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {str(p.relative_to(ROOT)) for p in (ROOT / "worker").rglob("*.lua")}
    assert lua and lua <= names, lua - names
    assert "worker/py.typed" in names


# --- Procfile -----------------------------------------------------------------------------------
def _procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)  # honcho's own pattern
        if match:
            entries[match.group(1)] = match.group(2)
    return entries


def test_procfile_commands_run() -> None:
    entries = _procfile()
    assert set(entries) >= {"worker", "sandbox"}
    for name, command in entries.items():
        argv = shlex.split(command)
        assert argv[0] == "paypoll" and argv[1] in COMMANDS, (name, argv)
        help_text = _paypoll_help(argv[1])
        for option in (a for a in argv[2:] if a.startswith("--")):
            assert option in help_text, f"{name}: paypoll {argv[1]} has no {option}"
    honcho = shutil.which("honcho") or str(Path(sys.executable).with_name("honcho"))
    result = subprocess.run([honcho, "check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Valid procfile detected" in result.stderr + result.stdout


# --- config examples and the README's configuration reference -----------------------------
def _default_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _expected_defaults() -> dict[str, str]:
    defaults = Settings()
    return {
        env_name(f.name): _default_text(getattr(defaults, f.name))
        for f in fields(Settings)
        if f.name != "accounts"
    }


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = (ROOT / "config/.env.example").read_text()
    commented = dict(re.findall(r"^# (PAYPOLL_[A-Z_]+)=(.*)$", text, re.MULTILINE))
    expected = _expected_defaults()
    missing = {k: v for k, v in expected.items() if commented.get(k) != v}
    assert not missing, f"config/.env.example lacks or mis-states: {missing}"
    for name in ACCOUNT_SETTINGS:
        assert f"# PAYPOLL_{name}=" in text
    # The uncommented lines (local development) are valid settings.
    active = dict(re.findall(r"^(PAYPOLL_[A-Z_]+)=(.*)$", text, re.MULTILINE))
    assert load_settings(active).accounts["default"].client_id == "sandbox-client"


def test_accounts_example_loads(tmp_path: Path) -> None:
    copy = tmp_path / "accounts.toml"
    shutil.copy(ROOT / "config/accounts.example.toml", copy)
    copy.chmod(0o600)
    accounts = load_accounts_file(copy)
    assert set(accounts) == {"acme", "globex"}


def test_readme_configuration_reference_is_complete() -> None:
    """Every setting (ENV_HELP) is in the README's table with its current default."""
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(PAYPOLL_[A-Z_]+)` \| `?([^`|]*)`? \|", readme, re.MULTILINE))
    expected = _expected_defaults()
    wrong = {k: (rows.get(k), v) for k, v in expected.items() if rows.get(k, "").strip() != v}
    assert not wrong, f"README rows (found, expected): {wrong}"
    for name in ACCOUNT_SETTINGS:
        assert f"`PAYPOLL_{name}`" in readme
    assert set(ENV_HELP) == {f.name for f in fields(Settings)} - {"accounts"}
    for command in ("scripts/demo", "scripts/test"):
        assert command in readme
    assert "docs/benchmarks.md" in readme


def test_the_sentinel_compose_variant_points_every_worker_at_three_sentinels() -> None:
    data: dict[str, Any] = read_yaml_subset((ROOT / "docker-compose.sentinel.yml").read_text())
    services = data["services"]
    assert {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3", "worker"} <= set(services)
    assert services["redis-replica"]["command"][1:4] == ["--replicaof", "redis", "6379"]
    url = services["worker"]["environment"]["PAYPOLL_REDIS_URL"]
    settings = load_settings({"PAYPOLL_REDIS_URL": url})
    assert settings.wait_replicas() == 1
    from worker.connection import parse_sentinel_url

    target = parse_sentinel_url(url)
    assert [host for host, _ in target.sentinels] == ["sentinel-1", "sentinel-2", "sentinel-3"]
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        command = " ".join(services[name]["command"])
        assert "sentinel monitor mymaster redis 6379 2" in command and "--sentinel" in command


def test_the_cluster_compose_variant_runs_three_masters_and_points_workers_at_them() -> None:
    data: dict[str, Any] = read_yaml_subset((ROOT / "docker-compose.cluster.yml").read_text())
    services = data["services"]
    nodes = ["redis-node-1", "redis-node-2", "redis-node-3"]
    assert {*nodes, "redis-cluster-init", "worker"} <= set(services)
    for name in nodes:
        command = services[name]["command"]
        for flag, value in (
            ("--cluster-enabled", "yes"),
            ("--appendonly", "yes"),
            ("--maxmemory-policy", "noeviction"),
            ("--cluster-announce-hostname", name),
        ):
            assert command[command.index(flag) + 1] == value, (name, flag)
        assert services["redis-cluster-init"]["depends_on"][name]["condition"] == "service_healthy"
    init = " ".join(services["redis-cluster-init"]["command"])
    assert "--cluster create" in init and "--cluster-yes" in init
    assert all(f"getent hosts {name}" in init for name in nodes)
    assert "$$(" in init  # compose would interpolate a single $
    worker = services["worker"]
    assert worker["depends_on"]["redis-cluster-init"]["condition"] == (
        "service_completed_successfully"
    )
    url = worker["environment"]["PAYPOLL_REDIS_URL"]
    from worker.connection import parse_cluster_url

    assert [host for host, _ in parse_cluster_url(url).nodes] == nodes
    # It goes with the RabbitMQ variant: together they make a configuration paypoll accepts.
    rabbit: dict[str, Any] = read_yaml_subset((ROOT / "docker-compose.rabbitmq.yml").read_text())
    broker = rabbit["services"]["worker"]["environment"]["PAYPOLL_BROKER_URL"]
    settings = load_settings({"PAYPOLL_REDIS_URL": url, "PAYPOLL_BROKER_URL": broker})
    assert settings.keys().cluster and settings.broker_url == broker


def test_the_rabbitmq_compose_variant_puts_every_worker_on_a_healthy_rabbitmq(
    compose: dict[str, Any],
) -> None:
    data: dict[str, Any] = read_yaml_subset((ROOT / "docker-compose.rabbitmq.yml").read_text())
    services = data["services"]
    rabbitmq = services["rabbitmq"]
    image = rabbitmq["image"]
    # Quorum queues need 3.8 (3.10 for the dead-letter queue's TTL): a pinned 3.10+ image.
    assert image.startswith("rabbitmq:") and not image.endswith(":latest")
    major, minor = (int(n) for n in image.split(":")[1].split("-")[0].split(".")[:2])
    assert (major, minor) >= (3, 10)
    assert "rabbitmq-data:/var/lib/rabbitmq" in rabbitmq["volumes"]
    assert "rabbitmq-data" in data["volumes"]
    assert "rabbitmq-diagnostics" in rabbitmq["healthcheck"]["test"]
    worker = services["worker"]
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    # Merged over the base file's worker, as compose does: valid settings, RabbitMQ for the jobs.
    env = {**compose["services"]["worker"]["environment"], **worker["environment"]}
    settings = load_settings(env)
    assert settings.uses_rabbitmq()
    from urllib.parse import urlsplit

    url = urlsplit(settings.broker_url)
    server = rabbitmq["environment"]
    assert url.hostname == "rabbitmq" and url.port == 5672
    assert (url.username, url.password) == (
        server["RABBITMQ_DEFAULT_USER"],
        server["RABBITMQ_DEFAULT_PASS"],
    )
    assert url.path.lstrip("/") == server["RABBITMQ_DEFAULT_VHOST"]
