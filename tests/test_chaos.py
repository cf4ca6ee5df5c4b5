"""The chaos suite (issues 7 and 13): the whole pipeline under kills, pauses, a Redis restart
or a Sentinel failover, and API faults.

Three fleets ``paypoll worker --processes 1`` are SIGKILLed in turn (the fleet itself, or its
worker child) and replaced, or their worker child is SIGSTOPped past PAYPOLL_DEAD_AFTER and
SIGCONTed; once per run Redis is SIGKILLed: the one server, restarted on its AOF, or the master
of a master + replica + 3 sentinels deployment, failed over to the replica. The sandbox injects
5% 5xx, 1% dropped creates, random latency and 4-second tokens. Every invariant is checked by
tests/chaos_harness.py; the full 1,000-payment run is benchmarks/soak.py.
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
    assert report.injected["kills"]["child_sigstop"] >= (1 if config.pause_for else 0)
    assert report.injected["redis_restart"]


@pytest.mark.timeout(240)
def test_chaos_300_payments_under_kills_pauses_restart_and_faults() -> None:
    _assert_clean(ChaosConfig(payments=300, time_limit=130.0, pause_for=7.0))


@pytest.mark.timeout(240)
def test_chaos_200_payments_through_a_sentinel_failover() -> None:
    _assert_clean(
        ChaosConfig(payments=200, time_limit=130.0, pause_for=7.0, redis_mode="sentinel", seed=9)
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_soak_1000_payments() -> None:
    _assert_clean(ChaosConfig(payments=1000, time_limit=480.0, seed=11))
