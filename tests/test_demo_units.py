"""The demo's parts one by one: quantiles from histogram buckets, the sandbox-rate window, the
accounts file it writes, the Redis it chooses and what it deletes there, and its views."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import time
from pathlib import Path

import pytest
import redis

from tests.redis_server import free_port
from worker.demo import orchestrator, probes
from worker.demo.redis_provider import choose_redis, redact_url
from worker.demo.stack import DemoPlan, write_accounts_file
from worker.demo.view import AccountLine, LiveView, PlainView, Progress
from worker.settings import load_accounts_file

EXPOSITION = """\
# HELP paypoll_api_call_seconds Latency
# TYPE paypoll_api_call_seconds histogram
paypoll_api_call_seconds_bucket{account="a",endpoint="get",le="0.01",outcome="200"} 2.0
paypoll_api_call_seconds_bucket{account="a",endpoint="get",le="0.1",outcome="200"} 6.0
paypoll_api_call_seconds_bucket{account="a",endpoint="get",le="+Inf",outcome="200"} 8.0
paypoll_api_call_seconds_bucket{account="b",endpoint="create",le="0.01",outcome="200"} 0.0
paypoll_api_call_seconds_bucket{account="b",endpoint="create",le="0.1",outcome="200"} 2.0
paypoll_api_call_seconds_bucket{account="b",endpoint="create",le="+Inf",outcome="200"} 2.0
paypoll_api_call_seconds_count{account="a",endpoint="get",outcome="200"} 8.0
paypoll_api_rate_limited_total{account="a"} 2.0
paypoll_api_rate_limited_total{account="b"} 1.0
"""


def test_histogram_buckets_sum_label_sets_and_quantiles_interpolate() -> None:
    buckets = probes.histogram_buckets(EXPOSITION, "paypoll_api_call_seconds")
    assert buckets == [(0.01, 2.0), (0.1, 8.0), (float("inf"), 10.0)]
    # rank 5 of 10: inside (0.01, 0.1], 3 of the 6 observations there.
    assert probes.quantile(0.5, buckets) == pytest.approx(0.01 + 0.09 * 3 / 6)
    assert probes.quantile(0.1, buckets) == pytest.approx(0.005)
    # In the +Inf bucket: the highest finite bound, as Prometheus answers.
    assert probes.quantile(0.99, buckets) == 0.1
    assert probes.quantile(0.5, []) is None
    assert probes.counter_total(EXPOSITION, "paypoll_api_rate_limited_total") == 3.0


def test_accepted_in_last_second_is_the_half_open_window() -> None:
    times = [1.0, 9.0, 9.5, 10.0, 10.4]
    assert probes.accepted_in_last_second(times, 10.0) == 2  # (9, 10]: 9.5 and 10.0
    assert probes.accepted_in_last_second(times, 20.0) == 0
    assert probes.accepted_in_last_second([], 1.0) == 0


def test_redact_url_hides_the_password_only() -> None:
    assert redact_url("redis://:s3cret@host:6380/1") == "redis://:***@host:6380/1"
    assert redact_url("redis://user:pw@h/0") == "redis://user:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_accounts_file_is_private_and_loads(tmp_path: Path) -> None:
    plan = DemoPlan.make(accounts=3, rate=5, processes=1, threads=1, seed=1)
    path = write_accounts_file(tmp_path / "accounts.toml", plan.accounts)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_accounts_file(path)
    assert list(loaded) == ["shop-a", "shop-b", "shop-c"]
    assert loaded["shop-a"].client_secret == plan.accounts[0].client_secret
    assert plan.prefix.startswith("paypoll-demo-")
    assert plan.accounts[0].client_secret.reveal() not in repr(plan)


def test_shared_redis_loses_only_the_demo_keys(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = DemoPlan.make(accounts=1, rate=5, processes=1, threads=1).prefix
    other = f"{prefix}x:kept"  # shares the prefix's text but not the "prefix:" namespace
    try:
        with contextlib.ExitStack() as stack:
            chosen = choose_redis(redis_url, probe_local=False, workdir=tmp_path, stack=stack)
            assert chosen.shared and chosen.child is None
            assert chosen.origin == "using PAYPOLL_REDIS_URL"
            client.mset({f"{prefix}:a": 1, f"{prefix}:{{acct}}:b": 2, other: 3})
            assert chosen.cleanup(prefix) == 2
        assert client.exists(f"{prefix}:a", f"{prefix}:{{acct}}:b") == 0
        assert client.get(other) == b"3"
    finally:
        client.delete(other)
        client.close()


def test_unreachable_redis_falls_back_to_a_private_one(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        chosen = choose_redis(
            f"redis://127.0.0.1:{free_port()}/0", probe_local=False, workdir=tmp_path, stack=stack
        )
        assert not chosen.shared and chosen.child is not None
        assert "started a private Redis" in chosen.origin and "does not answer" in chosen.origin
        assert redis.Redis.from_url(chosen.url).ping()
        child = chosen.child
    assert not child.alive()  # the stack stopped it


def _progress() -> Progress:
    return Progress(
        elapsed=3.0,
        total=10,
        counts={"pending": 4, "paid": 5, "expired": 1},
        accounts=[AccountLine("shop-a", 5, 5, 5, 0)],
    )


def test_plain_view_prints_one_line_per_update() -> None:
    out = io.StringIO()
    PlainView(out).progress(_progress())
    assert out.getvalue().count("\n") == 1
    assert "6/10 done" in out.getvalue() and "shop-a: 5/5 req/s now" in out.getvalue()


def test_live_view_redraws_its_block_in_place() -> None:
    out = io.StringIO()
    view = LiveView(out)
    view.progress(_progress())
    first = out.getvalue()
    assert "\x1b[" not in first.split("\n")[0][:4]  # nothing to erase the first time
    view.progress(_progress())
    # The second draw moves up over the 3 lines of the first block and clears below.
    assert out.getvalue()[len(first) :].startswith("\x1b[3F\x1b[J")


def test_demo_sandbox_gets_its_secrets_from_the_environment_not_the_command_line(
    tmp_path: Path,
) -> None:
    """`ps` shows every user a process's command line; the demo's sandbox secrets stay out."""
    import requests

    from worker.demo.stack import start_sandbox

    plan = DemoPlan.make(accounts=2, rate=5, processes=1, threads=1, seed=1)
    with contextlib.ExitStack() as stack:
        child, url = start_sandbox(plan, tmp_path, stack)
        command_line = Path(f"/proc/{child.process.pid}/cmdline").read_bytes()
        for account in plan.accounts:
            assert account.client_secret.reveal().encode() not in command_line
            answer = requests.post(
                f"{url}/oauth/token",
                auth=(account.client_id, account.client_secret.reveal()),
                data={"grant_type": "client_credentials"},
                timeout=5,
            )
            assert answer.status_code == 200  # the sandbox knows the key all the same


def test_sandbox_clients_variable_is_parsed_and_its_errors_hide_the_secret() -> None:
    from worker.sandbox.cli import clients_from_env

    assert clients_from_env("a:s1, b:s2\nc:s3") == {"a": "s1", "b": "s2", "c": "s3"}
    assert clients_from_env("") == {}
    with pytest.raises(
        ValueError, match=r"PAYPOLL_SANDBOX_CLIENTS: entry 2: expected ID:SECRET"
    ) as e:
        clients_from_env("a:s1 topsecretnocolon")
    assert "topsecretnocolon" not in str(e.value)


# The swallowed exception is the point: pytest reports it as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_exception_a_finalizer_swallowed_still_interrupts() -> None:
    """The demo's handler raises where the main thread is; inside a finalizer Python prints
    "Exception ignored" and goes on (a CI run: the demo ran on to the end after a SIGTERM).
    The next check of the loop raises it again."""
    reached: list[str] = []

    class ClosedLate:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs (and raises) here, inside the finalizer

    raised: list[str] = []
    with orchestrator._interruptible():
        ClosedLate()  # collected at once: its __del__ runs on this line
        reached.append("past the finalizer")
        try:
            orchestrator._raise_if_interrupted()
        except orchestrator.Interrupted as exc:
            raised.append(str(exc))
    assert reached == ["past the finalizer"]
    assert raised == ["SIGTERM"]
    # Outside the block the previous handler is back and nothing is left recorded for later.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
