"""A real Redis Sentinel deployment for the tests: a master, a replica and three sentinels on
free ports, with a failover on demand (SENTINEL FAILOVER) or by killing the master."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from tests.redis_server import RedisServer, free_port, redis_server_binary
from tests.waiting import wait_until

SERVICE = "mymaster"


class SentinelTopology:
    """Master + replica + 3 sentinels (quorum 2, down-after 1 s)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="paypoll-sentinel-")
        self.dir = Path(self._tmp.name)
        self.servers: list[RedisServer] = []
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> None:
        master = RedisServer(directory=self._subdir("a"))
        master.start()
        replica = RedisServer(
            directory=self._subdir("b"), extra_args=["--replicaof", "127.0.0.1", str(master.port)]
        )
        replica.start()
        self.servers = [master, replica]
        wait_until(lambda: self._link_up(replica.port), timeout=15, what="replica in sync")
        binary = redis_server_binary()
        assert binary is not None
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel-{i}.conf"
            conf.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        "bind 127.0.0.1",
                        "protected-mode no",
                        f"dir {self.dir}",
                        f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2",
                        f"sentinel down-after-milliseconds {SERVICE} 1000",
                        f"sentinel failover-timeout {SERVICE} 5000",
                        f"sentinel parallel-syncs {SERVICE} 1",
                        "",
                    ]
                )
            )
            self._sentinels.append(
                subprocess.Popen(
                    [binary, str(conf), "--sentinel", "--loglevel", "warning"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        wait_until(self._sentinels_agree, timeout=30, what="sentinels see master, replica, peers")

    def _subdir(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir()
        return path

    @staticmethod
    def _link_up(port: int) -> bool:
        with contextlib.suppress(redis.RedisError):
            info = redis.Redis(port=port).info("replication")
            return info.get("master_link_status") == "up"
        return False

    def _sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[index], socket_timeout=2)

    def _sentinels_agree(self) -> bool:
        try:
            for i in range(3):
                s = self._sentinel(i)
                if len(s.sentinel_sentinels(SERVICE)) < 2 or len(s.sentinel_slaves(SERVICE)) < 1:
                    return False
        except redis.RedisError:
            return False
        return True

    def master_port(self) -> int:
        _host, port = self._sentinel().sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def failover(self, timeout: float = 30.0) -> int:
        """SENTINEL FAILOVER; returns the new master's port once it is master and sees a
        replica again."""
        old = self.master_port()
        self._sentinel().sentinel_failover(SERVICE)
        return self._wait_new_master(old, timeout)

    def kill_master(self, timeout: float = 30.0, promoted: Callable[[], None] | None = None) -> int:
        """SIGKILL the master; once the sentinels promoted the replica (``promoted`` is called
        then), start the old one again (the sentinels turn it into a replica). Returns the new
        master's port."""
        old = self.master_port()
        self.server_on(old).stop(kill=True)
        new = self._wait_new_master(old, timeout, need_replica=False)
        if promoted is not None:
            promoted()
        self.server_on(old).start()
        wait_until(lambda: self._link_up(old), timeout=timeout, what="the old master as replica")
        return new

    def _wait_new_master(self, old: int, timeout: float, need_replica: bool = True) -> int:
        def promoted() -> int | None:
            with contextlib.suppress(redis.RedisError, StopIteration):
                port = self.master_port()
                role = redis.Redis(port=port).info("replication")["role"]
                if port != old and role == "master" and (not need_replica or self._link_up(old)):
                    return port
            return None

        port = wait_until(promoted, timeout=timeout, interval=0.1, what="a new master")
        return int(port)

    def stop(self) -> None:
        for proc in self._sentinels:
            proc.kill()
            proc.wait(10)
        for server in self.servers:
            server.stop(kill=True)
        self._tmp.cleanup()


@contextlib.contextmanager
def running_sentinels() -> Iterator[SentinelTopology]:
    topology = SentinelTopology()
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
