"""LeanScript (worker/lean_script.py): the same answers and errors as redis-py's Script, on the
calling thread's own connection, on a real Redis; recovery after NOSCRIPT, a restart and a
timeout; redis-py's path wherever the lean one does not apply."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redis_server import RedisServer, running_redis
from worker.lean_script import LeanScript, close_lean_connections, register_lean_script

# Every reply type a script can give: integer, bulk string, nil inside an array, nested
# arrays, a status reply, and the arguments echoed back.
ECHO = """
redis.call('INCR', KEYS[1])
return {tonumber(redis.call('GET', KEYS[1])), ARGV[1], ARGV[2], false, {ARGV[3], {1, 2}},
        redis.status_reply('FINE')}
"""
FAIL = "return redis.error_reply('PAYPOLL_TEST went wrong: ' .. ARGV[1])"
COUNT = "return redis.call('INCR', KEYS[1])"
SLOW = "local t = redis.call('TIME'); local stop = t[1] * 1e6 + t[2] + ARGV[1] * 1e3; \
while true do local n = redis.call('TIME'); if n[1] * 1e6 + n[2] >= stop then break end end; \
return redis.call('INCR', KEYS[1])"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private server: these tests flush its scripts and restart it."""
    with running_redis() as srv:
        yield srv


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on ``server`` (the lean path's kind); its lean connections and pool
    closed afterwards."""
    plain = redis.Redis.from_url(server.url)
    yield plain
    close_lean_connections(plain)
    plain.close()


def _clients(srv: RedisServer) -> int:
    admin = redis.Redis.from_url(srv.url)
    try:
        return len(admin.client_list())
    finally:
        admin.close()


@pytest.mark.parametrize("decode", [False, True])
def test_answers_match_redis_py_script(server: RedisServer, decode: bool) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=decode)
    lean = register_lean_script(client, ECHO)
    plain = client.register_script(ECHO)
    assert isinstance(lean, LeanScript)
    args = ["é-text", 1.5, b"bytes"]
    got = lean(keys=["lean:n"], args=args)
    want = plain(keys=["lean:n"], args=args)
    # Same shapes and types (counter aside: each call incremented it).
    assert got[0] == 1 and want[0] == 2
    assert got[1:] == want[1:]
    text = "é-text" if decode else "é-text".encode()
    assert got[1] == text
    assert got[3] is None
    close_lean_connections(client)
    client.close()


def test_a_script_error_is_redis_py_s_and_the_connection_stays_usable(
    server: RedisServer,
    client: redis.Redis,
) -> None:
    fail = register_lean_script(client, FAIL)
    count = register_lean_script(client, COUNT)
    with pytest.raises(redis.ResponseError, match="PAYPOLL_TEST went wrong: why"):
        fail(args=["why"])
    with pytest.raises(redis.ResponseError) as plain_error:
        client.register_script(FAIL)(args=["why"])
    assert "PAYPOLL_TEST went wrong: why" in str(plain_error.value)
    # The error reply was read whole: the next call gets its own answer.
    assert count(keys=["lean:c"]) == 1
    assert count(keys=["lean:c"]) == 2
    # An argument redis-py refuses is refused the same way, before anything is sent.
    with pytest.raises(redis.DataError):
        count(keys=["lean:c"], args=[None])
    assert int(client.get("lean:c") or 0) == 2


def test_each_thread_runs_on_its_own_connection_outside_the_pool(
    server: RedisServer, client: redis.Redis
) -> None:
    count = register_lean_script(client, COUNT)
    before = _clients(server)
    for _ in range(20):
        count(keys=["lean:t"])
    assert _clients(server) == before + 1  # one connection for the main thread's 20 calls
    done = threading.Barrier(4)
    answers: list[int] = []

    def calls() -> None:
        answers.extend(count(keys=["lean:t"]) for _ in range(10))
        done.wait(10)  # all four connections open at once

    threads = [threading.Thread(target=calls) for _ in range(3)]
    for t in threads:
        t.start()
    done.wait(10)
    assert _clients(server) == before + 4
    for t in threads:
        t.join(10)
    assert sorted(answers) == list(range(21, 51))
    # The pool itself was never used for them.
    assert client.connection_pool._created_connections == 0  # type: ignore[attr-defined]
    close_lean_connections(client)
    assert _clients(server) == before


def test_noscript_loads_the_script_and_runs_it_once(client: redis.Redis) -> None:
    count = register_lean_script(client, COUNT)
    assert count(keys=["lean:s"]) == 1
    client.script_flush()
    assert count(keys=["lean:s"]) == 2  # NOSCRIPT: it did not run; then loaded and run once
    assert client.script_exists(count.sha) == [True]


def test_a_restarted_server_is_reconnected_to_and_the_script_loaded(
    server: RedisServer,
    client: redis.Redis,
) -> None:
    count = register_lean_script(client, COUNT)
    assert count(keys=["lean:r"]) == 1
    server.restart()  # keeps nothing: the thread's socket is dead and the script unknown
    assert count(keys=["lean:r"]) == 1
    assert int(client.get("lean:r") or 0) == 1  # run once after the restart, not twice


def test_without_retries_a_dead_server_raises_and_a_timeout_leaves_no_stale_reply(
    server: RedisServer,
) -> None:
    client = redis.Redis.from_url(server.url, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    slow = register_lean_script(client, SLOW)
    count = register_lean_script(client, COUNT)
    with pytest.raises(redis.TimeoutError):
        slow(keys=["lean:slow"], args=[600])
    # Redis runs one script at a time: a patient client's GET is answered once it is done.
    patient = redis.Redis.from_url(server.url, socket_timeout=10)
    assert patient.get("lean:slow") == b"1"
    patient.close()
    # The slow script's reply arrives later on the dropped connection; this call must get
    # its own answer on a new one, not that stale reply (1 from lean:slow).
    assert count(keys=["lean:other"]) == 1
    assert count(keys=["lean:other"]) == 2
    server.stop()
    with pytest.raises(redis.ConnectionError):
        count(keys=["lean:other"])
    close_lean_connections(client)
    client.close()


def _count_in_child(url: str, sha_holder: list[LeanScript], queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(sha_holder[0](keys=["lean:f"]))


def test_a_forked_child_makes_its_own_connection(server: RedisServer, client: redis.Redis) -> None:
    count = register_lean_script(client, COUNT)
    assert count(keys=["lean:f"]) == 1  # the parent's thread connection exists now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_count_in_child, args=(server.url, [count], queue))
    child.start()
    assert queue.get(timeout=10) == 2
    child.join(10)
    assert child.exitcode == 0
    # The child did not use or close the parent's socket: it still answers in order.
    assert count(keys=["lean:f"]) == 3
    assert count(keys=["lean:f"]) == 4


def test_redis_py_s_path_where_the_lean_one_does_not_apply(
    server: RedisServer, client: redis.Redis
) -> None:
    count = register_lean_script(client, COUNT)
    # A pipeline: queued with the pipeline, as redis-py's Script does.
    pipe = client.pipeline(transaction=False)
    count(keys=["lean:p"], client=pipe)
    count(keys=["lean:p"], client=pipe)
    assert pipe.execute() == [1, 2]

    # Clients the lean path leaves alone: a subclass, a blocking pool, another encoding.
    class Subclass(redis.Redis):
        pass

    others = [
        Subclass.from_url(server.url),
        redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(server.url)),
        redis.Redis.from_url(server.url, encoding="latin-1"),
    ]
    for other in others:
        script = register_lean_script(other, COUNT)
        assert script._channel is None  # type: ignore[attr-defined]
        assert script(keys=["lean:p"]) >= 3
        other.close()
    assert register_lean_script(client, COUNT)._channel is not None  # type: ignore[attr-defined]
