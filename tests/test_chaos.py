"""The chaos suite (issue 7): the whole pipeline under kills, a Redis restart and API faults.

Three fleets ``paypoll worker --processes 1`` are SIGKILLed in turn (the fleet itself, or its
worker child) and replaced, Redis is SIGKILLed and restarted on its AOF once, and the sandbox
injects 5% 5xx, 1% dropped creates, random latency and 4-second tokens. Every invariant is
checked by tests/chaos_harness.py; the full 1,000-payment run is benchmarks/soak.py.
"""

from __future__ import annotations

import pytest

from tests.chaos_harness import ChaosConfig, run_chaos
from tests.redis_server import redis_server_binary

pytestmark = pytest.mark.skipif(
    redis_server_binary() is None, reason="needs redis-server >= 7.0 (a private one is killed)"
)


def _assert_clean(config: ChaosConfig) -> None:
    report = run_chaos(config)
    print(report.summary())
    assert not report.failures, report.summary()
    # The run really was violent: kills of both kinds and the restart happened.
    assert report.injected["kills"]["fleet_sigkill"] >= 2
    assert report.injected["kills"]["child_sigkill"] >= 1
    assert report.injected["redis_restart"]


@pytest.mark.timeout(240)
def test_chaos_300_payments_under_kills_restart_and_faults() -> None:
    _assert_clean(ChaosConfig(payments=300, time_limit=130.0))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_soak_1000_payments() -> None:
    _assert_clean(ChaosConfig(payments=1000, time_limit=480.0, seed=11))
