"""How long a /metrics scrape takes, and how big it is, with many keys (issue 14's leftover: a
scrape at 1,000 keys took 20 s on a saturated host, past Prometheus's default 10 s timeout).

A real fleet (`paypoll worker --processes P --threads 2`) on a private redis-server with K
configured accounts and no payments: every series comes from the fleet's start-up priming
(worker/metrics.py: prime_accounts and friends), summed over the worker processes' multiprocess
files by the fleet's exporter. Nothing else runs: the figures are the floor of a scrape's cost
at K keys (a busy fleet adds the series of states and endpoints that happened). Per scrape: the
wall time of an HTTP GET of /metrics, its size and sample lines; and the worker processes'
RSS and the multiprocess directory's size.

    .venv/bin/python benchmarks/metrics_scrape.py [--keys 100,1000] [--processes 2] [--scrapes 3]
        [--write-docs]
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FleetProcess, machine, make_accounts, stack, status_kib
from common import write_section as write_docs_section


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 (our URL)
            body: bytes = response.read()
            return body
    except OSError:
        return None


def measure(keys: int, processes: int, scrapes: int) -> dict[str, float]:
    """Start the fleet, wait until its first scrape shows every worker's series, then time
    ``scrapes`` scrapes; the figures."""
    accounts = make_accounts(keys)
    with stack(accounts, account_rate=5) as st:
        metrics_dir = st.workdir / "metrics"  # in the stack's workdir: its size is measured
        st.env["PAYPOLL_METRICS_DIR"] = str(metrics_dir)
        fleet = FleetProcess(st, processes=processes, threads=2, metrics=True)
        try:
            pids = fleet.wait_workers(timeout=300)
            url = f"http://127.0.0.1:{fleet.metrics_port}/metrics"
            last = accounts[-1].name.encode()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                body = _get(url)
                if body and last in body:
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError("the fleet never exposed its last account's series")
            walls, size, lines = [], 0, 0
            for _ in range(scrapes):
                started = time.perf_counter()
                body = _get(url)
                walls.append(time.perf_counter() - started)
                assert body is not None, "scrape failed"
                size = len(body)
                lines = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
            files = list(metrics_dir.glob("*.db"))
            return {
                "keys": keys,
                "processes": processes,
                "scrape_min": min(walls),
                "scrape_max": max(walls),
                "bytes": size,
                "samples": lines,
                "samples_per_key": lines / keys,
                "rss_mib": max(status_kib(pid, "VmRSS") for pid in pids) / 1024,
                "files_mib": sum(f.stat().st_size for f in files) / 2**20,
            }
        finally:
            fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="100,1000", help="comma-separated key counts")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--scrapes", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    header = machine()
    rows = []
    for keys in (int(k) for k in args.keys.split(",")):
        r = measure(keys, args.processes, args.scrapes)
        print(r, flush=True)
        rows.append(
            f"| {keys:,} | {args.processes} | {r['scrape_min']:.2f}-{r['scrape_max']:.2f} s "
            f"| {r['bytes'] / 2**20:.1f} MiB | {r['samples']:,} | {r['samples_per_key']:.0f} "
            f"| {r['rss_mib']:.0f} MiB | {r['files_mib']:.0f} MiB |"
        )
    text = "\n".join(
        [
            "### /metrics at many keys (issue 14)",
            "",
            f"What: `.venv/bin/python benchmarks/metrics_scrape.py --keys {args.keys} "
            f"--processes {args.processes} --scrapes {args.scrapes} --write-docs`. {header}",
            "",
            "A fleet with no payments: the series are those primed at start-up. Scrape = one "
            "HTTP GET of the fleet's /metrics (min-max of the scrapes).",
            "",
            "| keys | worker processes | scrape | size | samples | per key "
            "| worker RSS (largest) | multiprocess files |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(text)
    if args.write_docs:
        write_docs_section("metrics-scrape", text)


if __name__ == "__main__":
    main()
