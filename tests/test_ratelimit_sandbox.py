"""The key proof of invariant 1: many processes, one API key, the real sandbox in its strictest
mode (at most `rate` accepted requests in any sliding window (t - 1 s, t]): no 429, and the
sandbox never saw more than `rate` requests in any 1-second window.
"""

from __future__ import annotations

from tests.sandbox_fixture import running_sandbox
from tests.test_ratelimit import max_in_window
from tests.test_ratelimit_processes import MARGIN, run_processes


def test_32_callers_in_4_processes_for_10_s_get_no_429(redis_url: str, key_prefix: str) -> None:
    duration = 10.0
    with running_sandbox(rate=5, client=["acme:s3cret"], limit_mode="sliding") as sandbox:
        statuses: dict[str, list[int]] = {}
        starts = run_processes(
            redis_url,
            key_prefix,
            [("acme", 8)] * 4,
            rate=5.0,
            duration=duration,
            sandbox=(sandbox.url, "s3cret"),
            statuses=statuses,
        )["acme"]
        seen = sandbox.stats(payments=False)["clients"]["acme"]
    assert seen["rate_limited"] == 0
    assert set(statuses["acme"]) == {200}
    assert seen["max_requests_in_1s"] <= 5
    assert max_in_window(starts) <= 5
    # The key was used at its limit less the margin: one call every 0.205 s.
    assert seen["total"] == len(starts) >= int(duration / (0.2 + MARGIN))


def test_two_keys_each_get_their_rate_through_the_sandbox(redis_url: str, key_prefix: str) -> None:
    duration = 3.0
    with running_sandbox(rate=5, client=["a:s3cret", "b:s3cret"], limit_mode="sliding") as sandbox:
        statuses: dict[str, list[int]] = {}
        # One run, both keys at once: their processes share Redis and the sandbox.
        starts = run_processes(
            redis_url,
            key_prefix,
            [("a", 8), ("a", 8), ("b", 8), ("b", 8)],
            rate=5.0,
            duration=duration,
            sandbox=(sandbox.url, "s3cret"),
            statuses=statuses,
        )
        seen = sandbox.stats(payments=False)["clients"]
    for account in ("a", "b"):
        assert seen[account]["rate_limited"] == 0
        assert seen[account]["max_requests_in_1s"] <= 5
        # Each key gets what one key alone gets: a call every 0.205 s.
        assert seen[account]["total"] == len(starts[account]) >= int(duration / (0.2 + MARGIN))
