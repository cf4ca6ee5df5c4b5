"""A poll's first round trip (worker/poll_start.py, issue 14): the track step's ownership, its
record and the key's slot for the GET in one script, on a private real Redis (its command
counts are this test's alone) and the real sandbox."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest
import redis

from tests.counting import CountingReserve
from tests.redis_server import RedisServer, running_redis
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from worker.runtime import Runtime
from worker.settings import Account, Secret, Settings
from worker.steps import run_track
from worker.store import State

CLIENT, SECRET = "acme", "acme-secret"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox(client=f"{CLIENT}:{SECRET}", rate=1000, pay_after="600:700") as sb:
        yield sb


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with running_redis() as s:
        yield s


def build(server: RedisServer, sandbox: RunningSandbox, *, identity: str) -> Runtime:
    settings = Settings(
        redis_url=server.url,
        api_url=sandbox.url,
        key_prefix="pp",
        accounts={CLIENT: Account(CLIENT, CLIENT, Secret(SECRET), rate=5)},
        read_timeout=2.0,
        connect_timeout=1.0,
    )
    rt = Runtime.build(settings)
    rt.identity = identity
    return rt


def in_flight(rt: Runtime, sandbox: RunningSandbox, count: int) -> list[str]:
    """``count`` pending payments (made in the sandbox, tracked here) with their track step
    claimed, as the sweeper would dispatch them; their references."""
    refs = []
    for i, payment_id in enumerate(sandbox.seed(CLIENT, count, prefix=f"{rt.identity}-")):
        ref = f"r{i}"
        assert rt.store.register_tracking(CLIENT, ref, payment_id)
        refs.append(ref)
    claim = rt.store.claim_due(CLIENT, budget=count, lease=30, batch=count)
    assert sorted(claim.tracks) == sorted(refs)
    return refs


class SentCommands:
    """The commands sent to ``server`` from now until :meth:`stop`, by name (a script by its
    name in ``rt``), as Redis's MONITOR saw them: every connection's, the lean scripts' own
    (worker/lean_script.py) included; not the commands scripts run inside Redis."""

    MARKER = "sent-commands-end"

    def __init__(self, rt: Runtime, server: RedisServer) -> None:
        self.sent: list[str] = []
        self._scripts = {
            rt.polls._script.sha: "poll_start",
            rt.limiter._reserve.sha: "reserve",
            rt.store._start_step.sha: "start_step",
            rt.store._transition.sha: "transition",
        }
        self._marker = redis.Redis.from_url(server.url)
        self._marker.ping()  # the marker's connection, opened (HELLO...) before MONITOR is on
        self._client = redis.Redis.from_url(server.url)
        self._monitor = self._client.monitor()
        self._monitor.__enter__()  # MONITOR is on when this returns
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            seen = self._monitor.next_command()
            if seen.get("client_type") == "lua":
                continue
            words = str(seen["command"]).split()
            if words[:2] == ["ECHO", self.MARKER]:
                return
            name = words[0].upper()
            self.sent.append(self._scripts.get(words[1], "?") if name == "EVALSHA" else name)

    def stop(self) -> list[str]:
        """The commands seen, once MONITOR has shown everything sent before this call."""
        self._marker.echo(self.MARKER)
        self._reader.join(10)
        assert not self._reader.is_alive(), "MONITOR never showed the end marker"
        self._monitor.__exit__()
        self._client.close()
        self._marker.close()
        return self.sent


def test_a_poll_books_its_slot_while_it_starts_its_step(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    rt = build(server, sandbox, identity="w1")
    (ref,) = in_flight(rt, sandbox, 1)
    rt.client.tokens.get(rt.settings.account(CLIENT))  # a token in hand (a token call would
    # take the booked slot and the GET book its own)
    reserves = CountingReserve(rt.limiter)
    assert run_track(rt, CLIENT, ref) == "polled"
    assert reserves.calls == 0  # the GET used the slot booked with the step's start
    rec = rt.store.get(CLIENT, ref)
    assert rec is not None and rec.state == State.PENDING and rec.polls == 1
    assert rec.slot_hold is None
    # The slot was booked on the key: the next booking is one interval after it.
    assert rt.limiter.reserve(CLIENT, 5, max_wait=1.0).wait > 0.15
    assert sandbox.stats()["clients"][CLIENT]["rate_limited"] == 0


def test_a_worker_poll_sends_one_command_fewer_than_a_start_then_a_reservation(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    sent: dict[str, list[str]] = {}
    for identity in ("", "w1"):
        # "": a process with no identity reads the record (one command) and the GET books its
        # slot (reserve.lua), the two round trips a worker's poll took before poll_start.lua
        rt = build(server, sandbox, identity=identity)
        warm_up, ref = in_flight(rt, sandbox, 2)
        assert run_track(rt, CLIENT, warm_up) == "polled"  # scripts loaded, token in hand
        rt.redis.delete(rt.keys.limiter(CLIENT))  # a free key: no wait for either
        commands = SentCommands(rt, server)
        assert run_track(rt, CLIENT, ref) == "polled"
        sent[identity or "none"] = commands.stop()
        rt.redis.delete(*rt.redis.keys("pp:*"))
    assert sent["none"] == ["HGETALL", "reserve", "transition"]
    assert sent["w1"] == ["poll_start", "transition"]


def test_consecutive_polls_are_spaced_by_the_keys_interval(
    server: RedisServer, sandbox: RunningSandbox
) -> None:
    rt = build(server, sandbox, identity="w1")
    refs = in_flight(rt, sandbox, 3)
    slots = []
    for ref in refs:
        started = rt.polls.start(CLIENT, ref, owner="w1", lease=30, rate=5, max_wait=2.0)
        assert started.record is not None and started.record.state == State.PENDING
        assert started.slot is not None
        slots.append(started.slot)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert gaps == [pytest.approx(rt.limiter.interval(5), abs=1e-5)] * 2
    owners = rt.redis.hgetall(rt.keys.owners(CLIENT))
    assert {k.decode(): v.decode() for k, v in owners.items()} == {f"track:{r}": "w1" for r in refs}


@pytest.mark.parametrize("case", ["not_in_flight", "not_pending", "holds_a_slot", "no_record"])
def test_nothing_is_booked_for_a_step_that_will_not_use_the_slot(
    server: RedisServer, sandbox: RunningSandbox, case: str
) -> None:
    rt = build(server, sandbox, identity="w1")
    (ref,) = in_flight(rt, sandbox, 1)
    record_key = rt.keys.payment(CLIENT, ref)
    if case == "not_in_flight":  # done or put back by the sweeper meanwhile
        rt.redis.zrem(rt.keys.inflight(CLIENT, "track"), ref)
    elif case == "not_pending":
        rt.redis.hset(record_key, "state", State.PAID.value)
    elif case == "holds_a_slot":  # an earlier run's far slot, held for this run
        rt.redis.hset(record_key, "slot_hold", repr(rt.store.now() + 1.0))
    else:
        rt.redis.delete(record_key)
    started = rt.polls.start(CLIENT, ref, owner="w1", lease=30, rate=5, max_wait=2.0)
    assert started.slot is None
    assert not rt.redis.exists(rt.keys.limiter(CLIENT))  # the key's state never written
    if case == "no_record":
        assert started.record is None
    else:
        assert started.record is not None
    if case == "holds_a_slot":
        assert started.record is not None and started.record.slot_hold is not None
