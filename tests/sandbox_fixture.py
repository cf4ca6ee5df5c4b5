"""Start the sandbox as a real process for tests, and stop it (no orphans).

Usage::

    from tests.sandbox_fixture import running_sandbox, sandbox_factory, sandbox_fixture

    with running_sandbox(rate=5, client=["a:s1", "b:s2"], limit_mode="fixed") as sb:
        requests.post(f"{sb.url}/oauth/token", ...)
        sb.stats()["clients"]["a"]["rate_limited"]

    sandbox = sandbox_fixture("--pay-after", "0.2:0.5", seed=3)   # a module-level fixture

    def test_x(sandbox_factory):          # import sandbox_factory into the test module
        sb = sandbox_factory(error_rate=0.5)

Options are ``paypoll sandbox`` options: positional strings are passed as they are; keyword
``name=value`` becomes ``--name value`` (``_`` -> ``-``; a list repeats the option; True is a
bare flag; None/False are left out).
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

DEFAULT_CLIENT = ("sandbox-client", "sandbox-secret")
START_TIMEOUT = 15.0  # seconds; the interpreter start and imports dominate


def sandbox_args(*args: str, **kwargs: Any) -> list[str]:
    """The command-line options that ``args`` and ``kwargs`` describe (see module docstring)."""
    result = list(args)
    for name, value in kwargs.items():
        option = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            result.append(option)
        elif isinstance(value, list | tuple):
            for item in value:
                result += [option, str(item)]
        else:
            result += [option, str(value)]
    return result


def _clients(argv: list[str]) -> dict[str, str]:
    clients = {}
    for option, value in itertools.pairwise(argv):
        if option == "--client":
            client_id, _, secret = value.partition(":")
            clients[client_id] = secret
    return clients or {DEFAULT_CLIENT[0]: DEFAULT_CLIENT[1]}


class RunningSandbox:
    """A sandbox process; ``url`` is its base URL, ``clients`` maps client_id to secret."""

    def __init__(self, *args: str, timeout: float = START_TIMEOUT, **kwargs: Any) -> None:
        argv = sandbox_args(*args, **kwargs)
        if "--port" not in argv:
            argv += ["--port", "0"]
        self.argv = argv
        self.clients = _clients(argv)
        # Closed in stop(): it outlives this method.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.sandbox", "--exit-with-parent", *argv],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._session = requests.Session()
        try:
            self.url = self._read_url(timeout)
        except BaseException:
            self.stop()
            raise
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read_url(self, timeout: float) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"sandbox did not start in {timeout}s: {self.stderr()}")
                if selector.select(min(left, 0.1)):
                    line = self.process.stdout.readline().decode().strip()
                    prefix = "sandbox listening on "
                    if not line.startswith(prefix):
                        raise RuntimeError(f"sandbox said {line!r} at start: {self.stderr()}")
                    return line[len(prefix) :]
                if self.process.poll() is not None:
                    raise RuntimeError(f"sandbox exited at start: {self.stderr()}")

    def stderr(self) -> str:
        """What the process wrote to stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _admin(self, method: str, path: str, json: Any = None) -> Any:
        response = self._session.request(method, f"{self.url}{path}", json=json, timeout=10)
        response.raise_for_status()
        return response.json()

    def stats(self, *, payments: bool = True, times: bool = False) -> dict[str, Any]:
        """``GET /_admin/stats`` (schema: worker/sandbox/__init__.py)."""
        query = f"?payments={int(payments)}&times={int(times)}"
        result: dict[str, Any] = self._admin("GET", f"/_admin/stats{query}")
        return result

    def client_stats(self, client_id: str) -> dict[str, Any]:
        """One client's entry of the stats (an empty dict when it made no request)."""
        result: dict[str, Any] = self.stats(payments=False)["clients"].get(client_id, {})
        return result

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        """``POST /_admin/faults``: e.g. ``set_faults(error_rate=0.5, latency_ms="5:10")``."""
        result: dict[str, Any] = self._admin("POST", "/_admin/faults", changes)
        return result

    def reset(self, *, keep_faults: bool = False) -> None:
        """``POST /_admin/reset``: forget tokens, payments and stats."""
        self._admin("POST", "/_admin/reset", {"keep_faults": keep_faults})

    def force_status(self, payment_id: str, status: str) -> dict[str, Any]:
        """Make a payment terminal now (``POST /_admin/payments/{id}``)."""
        result: dict[str, Any] = self._admin(
            "POST", f"/_admin/payments/{payment_id}", {"status": status}
        )
        return result

    def seed(self, client_id: str, count: int, prefix: str = "") -> list[str]:
        """``POST /_admin/seed``: ``count`` payments of ``client_id`` made now, outside the
        API (no rate limit); their ids."""
        body = {"client_id": client_id, "count": count, "prefix": prefix}
        result: list[str] = self._admin("POST", "/_admin/seed", body)["ids"]
        return result

    def stop(self) -> None:
        """Terminate the process (kill it if it lingers) and release its pipes."""
        self._session.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()

    def __enter__(self) -> RunningSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_sandbox(*args: str, **kwargs: Any) -> Iterator[RunningSandbox]:
    """A started sandbox, stopped on exit (see the module docstring for the options)."""
    sandbox = RunningSandbox(*args, **kwargs)
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., RunningSandbox]]:
    """A function starting sandboxes (same options as ``running_sandbox``), all stopped after
    the test."""
    started: list[RunningSandbox] = []

    def start(*args: str, **kwargs: Any) -> RunningSandbox:
        sandbox = RunningSandbox(*args, **kwargs)
        started.append(sandbox)
        return sandbox

    yield start
    for sandbox in started:
        sandbox.stop()


def sandbox_fixture(
    *args: str, scope: str = "function", **kwargs: Any
) -> Callable[..., Iterator[RunningSandbox]]:
    """A pytest fixture yielding one sandbox started with these options.

    Assign it to a name in a test module or conftest: ``sandbox = sandbox_fixture(rate=5)``.
    With a wider ``scope``, call ``.reset()`` between tests to start from a clean state.
    """

    @pytest.fixture(scope=scope)  # type: ignore[call-overload,misc]
    def _fixture() -> Iterator[RunningSandbox]:
        with running_sandbox(*args, **kwargs) as sandbox:
            yield sandbox

    return _fixture  # type: ignore[no-any-return]
