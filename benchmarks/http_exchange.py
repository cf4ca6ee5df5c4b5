"""One GET's client CPU on each HTTP path paypoll has had (issue 14): requests' Session, a
bare ``http.client`` keep-alive connection, and the direct path's own sockets
(``worker/api/direct.py`` with ``worker/api/http1.py``).

Against the sandbox over a socket (a private one on a free port), one thread, one keep-alive
connection each: ``--calls`` GETs of a payment the sandbox answers with 401 (no token: the
answer's size is a real error's; the limiter is not involved, only HTTP). The three take turns
in ``--rounds`` rounds (the first to go alternates); client CPU is ``time.thread_time`` (user
and system, this thread) per call, so the sandbox's own CPU does not count.

    .venv/bin/python benchmarks/http_exchange.py [--calls 3000] [--rounds 4] [--write-docs]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON, machine, write_section

from tests.redis_server import free_port
from tests.waiting import wait_until
from worker.api.direct import DirectTransport

HEADERS = {"Authorization": "Bearer bench-token-0123456789", "Accept": "application/json"}
PATH = "/payments/request/pr_bench"


def _answers(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        connection.request("GET", "/")
        connection.getresponse().read()
        connection.close()
        return True
    except OSError:
        return False


def paths(port: int) -> dict[str, Callable[[], int]]:
    """Each path's one GET, returning the answer's status."""
    url = f"http://127.0.0.1:{port}{PATH}"
    session = requests.Session()
    bare = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    direct = DirectTransport()

    def by_requests() -> int:
        response = session.get(url, headers=HEADERS, timeout=(5, 5))
        response.content  # noqa: B018 (the body is read, as the client reads it)
        return response.status_code

    def by_http_client() -> int:
        bare.request("GET", PATH, headers=HEADERS)
        response = bare.getresponse()
        response.read()
        return response.status

    def by_direct() -> int:
        answer = direct.exchange(
            "GET",
            url,
            headers=HEADERS,
            body=None,
            gate=None,
            connect_timeout=5,
            read_timeout=5,
            limit=1_048_576,
        )
        return answer.status

    return {
        "requests Session": by_requests,
        "http.client connection": by_http_client,
        "direct (worker/api/http1.py)": by_direct,
    }


def run(calls: int, rounds: int) -> str:
    port = free_port()
    sandbox = subprocess.Popen(
        [PYTHON, "-m", "worker.sandbox", "--port", str(port), "--client", "bench:secret"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers(port), timeout=30, what="the sandbox")
        ways = paths(port)
        per_call: dict[str, list[float]] = {name: [] for name in ways}
        for name, call in ways.items():  # warm up: connect, caches
            assert call() == 401, name
            for _ in range(200):
                call()
        names = list(ways)
        for round_ in range(rounds):
            order = names if round_ % 2 == 0 else names[::-1]
            for name in order:
                call = ways[name]
                before = time.thread_time()
                for _ in range(calls):
                    call()
                per_call[name].append((time.thread_time() - before) / calls)
    finally:
        sandbox.kill()
        sandbox.wait()
    lines = [
        "### One GET's client CPU: requests, http.client and the direct path (issue 14)",
        "",
        f"What: `.venv/bin/python benchmarks/http_exchange.py --calls {calls} --rounds {rounds}`."
        " One thread, one keep-alive connection per path, GETs the sandbox answers with 401 over"
        " a socket; the paths take turns; `time.thread_time` (user + system CPU of the calling"
        f" thread) per call. Machine: {machine()}.",
        "",
        "| path | client CPU per GET (median of rounds) | rounds |",
        "|---|---|---|",
    ]
    for name, values in per_call.items():
        rounds_text = ", ".join(f"{1e6 * v:.0f}" for v in values)
        lines.append(f"| {name} | {1e6 * statistics.median(values):.0f} us | {rounds_text} us |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    text = run(args.calls, args.rounds)
    print(text)
    if args.write_docs:
        write_section("http-exchange", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
