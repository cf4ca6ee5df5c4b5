"""A real Redis Cluster for the tests: three masters on free ports (no replicas), created with
``redis-cli --cluster create``, and a live reshard on demand: one hash slot moved to another
master key by key (CLUSTER SETSLOT MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE), the way
``redis-cli --cluster reshard`` does it, so clients meet ASK and then MOVED redirections."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.redis_server import RedisServer, redis_server_binary
from tests.waiting import wait_until

MASTERS = 3


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too and below 65536."""
    while True:
        port = random.randint(20000, 50000)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port


def redis_cli_binary() -> str | None:
    """The redis-cli next to the chosen redis-server, else the one on PATH."""
    server = redis_server_binary()
    if server is not None:
        sibling = Path(server).with_name("redis-cli")
        if sibling.exists():
            return str(sibling)
    return shutil.which("redis-cli")


class ClusterTopology:
    """Three cluster-enabled masters sharing the 16384 slots."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="paypoll-cluster-")
        self.dir = Path(self._tmp.name)
        self.servers: list[RedisServer] = []

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming every node as a seed."""
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.servers)
        return f"redis+cluster://{nodes}"

    def start(self) -> None:
        cli = redis_cli_binary()
        if cli is None:
            raise RuntimeError(
                "redis-cli not found (it comes with redis-server: apt-get install redis-server)"
            )
        for i in range(MASTERS):
            directory = self.dir / f"n{i}"
            directory.mkdir()
            server = RedisServer(
                port=cluster_port(),
                directory=directory,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(directory / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            server.start()
            self.servers.append(server)
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in self.servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        wait_until(self._all_ok, timeout=30, what="cluster_state:ok on every node")

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    def _all_ok(self) -> bool:
        with contextlib.suppress(redis.RedisError):
            return all(
                self.node(s.port).cluster("info").get("cluster_state") == "ok"  # type: ignore[union-attr]
                for s in self.servers
            )
        return False

    def node_id(self, port: int) -> str:
        return str(self.node(port).execute_command("CLUSTER", "MYID").decode())

    def slot_of(self, key: str) -> int:
        return int(self.node(self.servers[0].port).execute_command("CLUSTER", "KEYSLOT", key))

    def owner_port(self, slot: int) -> int:
        """The port of the master serving ``slot``."""
        for start, end, master, *_ in self.node(self.servers[0].port).execute_command(
            "CLUSTER", "SLOTS"
        ):
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise LookupError(f"slot {slot} is not served")

    def keys_in_slot(self, slot: int) -> int:
        return int(
            self.node(self.owner_port(slot)).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        )

    def move_slot(self, slot: int, *, batch: int = 5, pause: float = 0.05) -> int:
        """Move ``slot`` to the next master, a few keys at a time with a pause between batches
        (so that clients run commands while it is half moved); returns the new owner's port."""
        source = self.owner_port(slot)
        ports = [s.port for s in self.servers]
        target = ports[(ports.index(source) + 1) % len(ports)]
        src, dst = self.node(source), self.node(target)
        src_id, dst_id = self.node_id(source), self.node_id(target)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while True:
            names = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not names:
                break
            src.execute_command(
                "MIGRATE", "127.0.0.1", target, "", 0, 5000, "REPLACE", "KEYS", *names
            )
            time.sleep(pause)
        for port in ports:
            self.node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        wait_until(lambda: self.owner_port(slot) == target, timeout=10, what="the slot's new owner")
        return target

    def stop(self) -> None:
        for server in self.servers:
            server.cleanup()
        with contextlib.suppress(OSError):
            self._tmp.cleanup()


@contextlib.contextmanager
def running_cluster() -> Iterator[ClusterTopology]:
    """A started three-master cluster, stopped and removed on exit."""
    topology = ClusterTopology()
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
