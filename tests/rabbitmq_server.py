"""A real RabbitMQ for the tests (issue 14): a private vhost on the local server, or a private
server when none answers.

``rabbitmq_broker()`` (session scope) finds a RabbitMQ: the one answering on 127.0.0.1:5672
(guest/guest) when ``rabbitmqctl`` can manage it, else a private ``rabbitmq-server`` started on
free ports in a temporary directory (if installed), else None with the reason. Each test then
gets a vhost of its own (``broker.vhost()``: ``rabbitmqctl add_vhost`` + ``set_permissions``,
``delete_vhost`` afterwards), so tests never see each other's queues: paypoll's queue names are
fixed, a vhost is what separates deployments on one RabbitMQ.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.redis_server import free_port

LOCAL_PORT = 5672
START_TIMEOUT = 60.0  # seconds for a private rabbitmq-server to boot (Erlang: about 5-10 s)
CTL_TIMEOUT = 60.0  # seconds for one rabbitmqctl call


def _answers(port: int, timeout: float = 0.5) -> bool:
    """True when something speaks AMQP on 127.0.0.1:``port`` (it answers the protocol header)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(8)[:1] == b"\x01"  # a Connection.Start method frame
    except OSError:
        return False


@dataclass
class RabbitMQ:
    """A RabbitMQ server the tests may manage with ``rabbitmqctl`` (``-n node`` when private)."""

    port: int
    node: str | None = None  # None: the machine's default node
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    process: subprocess.Popen[bytes] | None = None
    base: Path | None = None

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl ARGS`` against this server."""
        node = ["-n", self.node] if self.node else []
        return subprocess.run(
            ["rabbitmqctl", *node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CTL_TIMEOUT,
            check=check,
        )

    def url(self, vhost: str) -> str:
        """The amqp:// URL of ``vhost`` on this server, as guest (RabbitMQ's default user)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    @contextlib.contextmanager
    def vhost(self) -> Iterator[str]:
        """A fresh vhost guest may use; deleted (with its queues) afterwards."""
        name = f"pptest-{uuid.uuid4().hex[:10]}"
        self.ctl("add_vhost", name)
        try:
            self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
            yield name
        finally:
            self.ctl("delete_vhost", name, check=False)

    @contextlib.contextmanager
    def user(self, vhost: str, password: str) -> Iterator[str]:
        """A user of its own with ``password`` and every permission on ``vhost``: its URL.
        Deleted afterwards."""
        name = f"pptest-{uuid.uuid4().hex[:8]}"
        self.ctl("add_user", name, password)
        try:
            self.ctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
            yield f"amqp://{name}:{password}@127.0.0.1:{self.port}/{vhost}"
        finally:
            self.ctl("delete_user", name, check=False)

    def queues(self, vhost: str) -> dict[str, tuple[str, str]]:
        """name -> (durable, type) of every queue of ``vhost``, as rabbitmqctl lists them."""
        done = self.ctl(
            "list_queues", "-q", "--no-table-headers", "-p", vhost, "name", "durable", "type"
        )
        found = {}
        for line in done.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3:
                found[parts[0]] = (parts[1], parts[2])
        return found

    def stop(self) -> None:
        """Stop a private server (the machine's own is left alone)."""
        if self.process is None:
            return
        self.ctl("stop", check=False)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)


def _hand_over(base: Path) -> None:
    """Run as root, rabbitmq-server's wrapper drops to the ``rabbitmq`` user: give it the
    directory."""
    if os.geteuid() != 0:
        return
    import pwd

    try:
        owner = pwd.getpwnam("rabbitmq")
    except KeyError:
        return
    for path in [base, *base.rglob("*")]:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _start_private() -> RabbitMQ:
    """A rabbitmq-server of our own: its node name, ports and directories in a temp dir."""
    base = Path(tempfile.mkdtemp(prefix="pptest-rabbitmq-"))
    port, dist = free_port(), free_port()
    node = f"pptest{uuid.uuid4().hex[:8]}@localhost"
    config = base / "rabbitmq.conf"
    config.write_text(f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n")
    (base / "enabled_plugins").write_text("[].\n")
    env = dict(
        os.environ,
        RABBITMQ_NODENAME=node,
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist),
        RABBITMQ_CONFIG_FILE=str(config),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
        RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
        RABBITMQ_LOG_BASE=str(base / "log"),
        RABBITMQ_PID_FILE=str(base / "rabbitmq.pid"),
        RABBITMQ_FEATURE_FLAGS_FILE=str(base / "feature_flags"),
        RABBITMQ_QUORUM_DIR=str(base / "quorum"),
        ERL_CRASH_DUMP=str(base / "erl_crash.dump"),
    )
    for sub in ("mnesia", "log", "quorum"):
        (base / sub).mkdir()
    _hand_over(base)
    with (base / "server.out").open("wb") as log:
        process = subprocess.Popen(
            ["rabbitmq-server"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = RabbitMQ(port=port, node=node, env=env, process=process, base=base)
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            out = (base / "server.out").read_text(errors="replace")[-2000:]
            server.stop()
            raise RuntimeError(f"rabbitmq-server did not start:\n{out}")
        time.sleep(0.25)
    server.ctl("await_startup")
    return server


@contextlib.contextmanager
def rabbitmq_broker() -> Iterator[tuple[RabbitMQ | None, str]]:
    """(server, "") for the tests to use, or (None, why not). ``PAYPOLL_TEST_RABBITMQ=private``
    starts a private server even when the local one answers."""
    if shutil.which("rabbitmqctl") is None:
        yield None, "needs RabbitMQ (rabbitmqctl not found: apt-get install rabbitmq-server)"
        return
    if os.environ.get("PAYPOLL_TEST_RABBITMQ") != "private" and _answers(LOCAL_PORT):
        local = RabbitMQ(port=LOCAL_PORT)
        if local.ctl("list_vhosts", check=False).returncode == 0:
            yield local, ""
            return
    if shutil.which("rabbitmq-server") is None:
        yield None, "no RabbitMQ answers on 127.0.0.1:5672 and rabbitmq-server is not installed"
        return
    try:
        server = _start_private()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        yield None, f"could not start a private rabbitmq-server: {exc}"
        return
    try:
        yield server, ""
    finally:
        server.stop()
