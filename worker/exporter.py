"""The fleet's metrics endpoint: prometheus-client's multiprocess directory and the HTTP exporter.

How a fleet uses it (worker/fleet.py), in this order:

1. ``path = prepare_multiprocess_dir(directory)``: creates the directory, removes the metric files
   a previous fleet left there (stale counters would be summed into ours).
2. ``os.environ[MULTIPROC_ENV] = str(path)`` *before* starting any worker process, and start the
   workers with ``multiprocessing.get_context("spawn")``: prometheus-client picks its
   multiprocess mode when ``prometheus_client.values`` is first imported, so only fresh
   interpreters started after the variable is set write their metrics to the directory (a forked
   child would inherit the parent's in-memory mode).
3. ``exporter = start_exporter(host=settings.metrics_host, port=settings.metrics_port,
   multiprocess_dir=path, collectors=[StoreCollector(...), AccountLimitsCollector(...)])`` in
   the parent. It serves ``/metrics``: the sum over every worker process's files
   (``MultiProcessCollector``) plus the given collectors, read at scrape time. A port in use
   raises :class:`~worker.errors.ConfigError` naming host:port and the setting to change.
4. ``mark_process_dead(pid, path)`` each time a worker process exits (and before replacing it):
   its ``livesum`` gauges stop counting; its counters and histograms stay, as counters must.
5. ``exporter.stop()`` at shutdown.

The parent itself records nothing: its own metrics would not be in the directory.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.registry import Collector

from worker.errors import ConfigError
from worker.settings import env_name

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client in every worker process


def prepare_multiprocess_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and remove the metric files (``*.db``) in it; return it absolute.

    Only prometheus-client's ``*.db`` files are removed, never anything else, so pointing the
    setting at a wrong directory cannot destroy data. Raises ConfigError when ``path`` is not a
    writable directory.
    """
    directory = Path(path).expanduser().absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            if stale.is_file():
                stale.unlink()
        probe = directory / ".paypoll-write-probe"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{MULTIPROC_ENV}={directory}: cannot use it for worker metrics ({exc.strerror})"
        ) from None
    return directory


def mark_process_dead(pid: int, path: str | Path | None = None) -> None:
    """Stop counting the live gauges of worker process ``pid``, which has exited.

    ``path`` defaults to ``PROMETHEUS_MULTIPROC_DIR`` of this process's environment.
    """
    # prometheus-client leaves these two functions unannotated.
    prom_multiprocess.mark_process_dead(pid, None if path is None else str(path))  # type: ignore[no-untyped-call]


def build_registry(
    *, multiprocess_dir: str | Path | None = None, collectors: Iterable[Collector] = ()
) -> CollectorRegistry:
    """A registry serving the worker processes' files in ``multiprocess_dir`` and ``collectors``."""
    registry = CollectorRegistry()
    if multiprocess_dir is not None:
        prom_multiprocess.MultiProcessCollector(registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
    for collector in collectors:
        registry.register(collector)
    return registry


@dataclass
class Exporter:
    """A running metrics endpoint; ``port`` is the bound one (useful when 0 was asked)."""

    host: str
    port: int
    registry: CollectorRegistry
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """The URL Prometheus scrapes."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port, waiting at most ``timeout`` seconds for the
        serving loop (it notices the request within its 0.5 s poll interval)."""
        # BaseServer.shutdown() waits without a limit for serve_forever to return; a loop stuck
        # in a system call would make a fleet's shutdown hang, so wait for it from a helper.
        stopper = threading.Thread(target=self._server.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout)
        self._server.server_close()
        self._thread.join(timeout=1)


def start_exporter(
    *,
    host: str,
    port: int,
    multiprocess_dir: str | Path | None = None,
    collectors: Iterable[Collector] = (),
    registry: CollectorRegistry | None = None,
) -> Exporter:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread and return its handle.

    Serves ``registry`` when given, otherwise ``build_registry(multiprocess_dir=...,
    collectors=...)``. Raises ConfigError naming ``host:port`` and ``PAYPOLL_METRICS_PORT`` /
    ``PAYPOLL_METRICS_HOST`` when the address is taken or cannot be bound, so a fleet stops with
    one clear line instead of restarting into the same failure.
    """
    if registry is None:
        registry = build_registry(multiprocess_dir=multiprocess_dir, collectors=collectors)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            reason = "the address is already in use (another paypoll fleet or another program?)"
        else:
            reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"cannot serve metrics on {where}: {reason}; set {env_name('metrics_port')} "
            f"(or {env_name('metrics_host')}) to a free address"
        ) from None
    # Never block in accept(): the serving loop calls it only when select() said a connection
    # was waiting, but one can be gone by then, and a blocking accept() would hold the loop
    # (and shutdown(), which waits for it) until some other client connects. Non-blocking, it
    # raises BlockingIOError, which socketserver treats as "nothing to accept".
    server.socket.setblocking(False)
    bound_port = int(server.server_address[1])
    return Exporter(host=host, port=bound_port, registry=registry, _server=server, _thread=thread)
