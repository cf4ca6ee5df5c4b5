"""Sandbox throughput: requests/s and latency of `paypoll sandbox` under keep-alive load.

Starts the sandbox as a real process (rate limit set out of the way), then runs load-generator
PROCESSES (so the client's GIL is not the server's), each with threads holding one keep-alive
connection and sending authenticated GET /payments/request/{id} (or creates) back to back.
Prints requests/s and latency percentiles measured by the clients, and checks the sandbox
counted the same number of requests.

    .venv/bin/python benchmarks/sandbox.py --duration 5 --processes 2 --connections 8
    .venv/bin/python benchmarks/sandbox.py --endpoint create
    .venv/bin/python benchmarks/sandbox.py --wrk   # with wrk installed (apt-get install wrk)
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.sandbox_fixture import RunningSandbox

CLIENT = ("bench", "bench-secret")
BODY = json.dumps(
    {"amount": "100", "currency": "USD", "redirect_url": "https://shop.example/thanks"}
).encode()


def _token(url: str) -> str:
    import requests

    response = requests.post(
        f"{url}/oauth/token",
        auth=CLIENT,
        data={"grant_type": "client_credentials"},
        timeout=5,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def _worker(
    port: int, token: str, path: str, method: str, threads: int, duration: float, out: object
) -> None:
    """One load process: ``threads`` keep-alive connections for ``duration`` seconds."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = BODY if method == "POST" else None
    start_at = time.time() + 0.3  # all threads start together
    stop_at = start_at + duration

    def run(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = latencies[i]
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            t0 = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - t0)
            if response.status != 200:
                errors[i] += 1
        conn.close()

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    flat = [x for part in latencies for x in part]
    out.put((flat, sum(errors)))  # type: ignore[attr-defined]


def python_load(args: argparse.Namespace, sb: RunningSandbox) -> dict[str, float]:
    token = _token(sb.url)
    if args.endpoint == "get":
        import requests

        created = requests.post(
            f"{sb.url}/payments/request",
            data=BODY,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=5,
        )
        path, method = f"/payments/request/{created.json()['id']}", "GET"
    else:
        path, method = "/payments/request", "POST"
    before = sb.client_stats(CLIENT[0]).get("total", 0)
    queue: multiprocessing.Queue[tuple[list[float], int]] = multiprocessing.Queue()
    per_process = max(1, args.connections // args.processes)
    procs = [
        multiprocessing.Process(
            target=_worker,
            args=(sb.port, token, path, method, per_process, args.duration, queue),
        )
        for _ in range(args.processes)
    ]
    for proc in procs:
        proc.start()
    latencies: list[float] = []
    errors = 0
    for _ in procs:
        part, errs = queue.get(timeout=args.duration + 60)
        latencies += part
        errors += errs
    for proc in procs:
        proc.join()
    counted = sb.client_stats(CLIENT[0])["total"] - before
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies),
        "counted_by_sandbox": counted,
        "non_200": errors,
        "requests_per_s": len(latencies) / args.duration,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "max_ms": latencies[-1] * 1000,
    }


def wrk_load(args: argparse.Namespace, sb: RunningSandbox) -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    token = _token(sb.url)
    import requests

    created = requests.post(
        f"{sb.url}/payments/request",
        data=BODY,
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    url = f"{sb.url}/payments/request/{created.json()['id']}"
    with tempfile.TemporaryDirectory() as tmp:
        # The token goes in a header via a Lua script, not on the command line.
        script = Path(tmp) / "auth.lua"
        script.write_text(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
        result = subprocess.run(
            [
                *(wrk, "-t2", f"-c{args.connections}", f"-d{int(args.duration)}s"),
                *("--latency", "-s", str(script), url),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load")
    parser.add_argument("--processes", type=int, default=2, help="load-generator processes")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--endpoint", choices=("get", "create"), default="get")
    parser.add_argument("--wrk", action="store_true", help="use wrk as the load generator")
    args = parser.parse_args()
    client = f"{CLIENT[0]}:{CLIENT[1]}"
    with RunningSandbox(rate=1e9, client=client, stay_pending=1) as sb:
        print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
        if args.wrk:
            print(f"wrk, {args.connections} connections, {args.duration:g} s, GET:")
            print(wrk_load(args, sb))
            return 0
        result = python_load(args, sb)
        print(
            f"{args.endpoint}: {args.processes} processes x "
            f"{max(1, args.connections // args.processes)} keep-alive connections (http.client), "
            f"{args.duration:g} s"
        )
        for key, value in result.items():
            print(f"  {key}: {value:.1f}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
