"""Lua scripts on the hot path, run with a Redis round trip and little else.

A poll runs three scripts (its start, its outcome, dramatiq's ack). Through redis-py's
``Script.__call__`` one costs 62 us of client CPU on one thread (86 us on eight), against 25
(38) us for the same EVALSHA written and read on a connection the thread keeps
(benchmarks/lean_script.py, docs/benchmarks.md): redis-py checks a connection out of its pool
and back in (a lock and a ``poll()`` readiness check each time), wraps the command in its
retry closure and its observability hooks, and encodes each argument in Python.
``LeanScript`` is a ``Script`` whose call, when it can, sends the EVALSHA on a connection
owned by the calling thread, packed by hiredis, and reads the reply with the same
connection's parser (the same decoding, the same error replies as ``ResponseError``). In the
fleet the saving is inside the run-to-run noise (docs/benchmarks.md, issue 14).

What stays redis-py's, so the behaviour is the one it has always had:

- a script Redis does not know (NOSCRIPT: a restarted or failed-over server) is loaded and
  run again, as ``Script.__call__`` does (NOSCRIPT means it did not run), on the same
  connection;
- a connection error or timeout closes the thread's connection, and the call is then made
  through ``Script.__call__``, with the client's own retry policy, when that policy retries at
  all: the same re-run redis-py makes after such an error (one attempt more than redis-py
  alone would make, the first being the lean one), and no re-run when it retries none;
- pipelines (``client=``), Sentinel's and Redis Cluster's clients, client-side caching, and
  any encoding other than UTF-8 always go through ``Script.__call__``.

Each thread keeps one connection per connection pool, made with the pool's own settings
(address, password, db, TLS, timeouts, health checks), outside the pool's count: a worker
process has one more connection per thread that runs scripts.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from hiredis import pack_command as hiredis_pack  # redis[hiredis] is a dependency
from redis.commands.core import Script
from redis.exceptions import NoScriptError

#: Errors after which the thread's connection is closed and the call handed to redis-py.
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


#: Forks of this process so far, in the child: a thread's connection made before the last
#: fork is its parent's socket, and the child makes its own (no getpid() per call).
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class _ThreadConnections(threading.local):
    """One connection per thread (``connection``), and the ``_forks`` count it was made at."""

    connection: Any = None
    forks: int = -1


class _LeanChannel:
    """The calling thread's own connection to one pool's server."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._local = _ThreadConnections()
        self._lock = threading.Lock()
        self._made: weakref.WeakSet[Any] = weakref.WeakSet()

    def connection(self) -> Any:
        """This thread's connection, connected and checked as redis-py's pool checks each one
        it hands out: one the server closed meanwhile (a restart, an idle timeout) reads as
        EOF and is reconnected, so a command is never sent on it."""
        local = self._local
        if local.connection is None or local.forks != _forks:
            pool = self._pool
            local.connection = pool.connection_class(**pool.connection_kwargs)
            local.forks = _forks
            with self._lock:
                self._made.add(local.connection)
        connection = local.connection
        try:
            connection.connect()  # nothing when connected
            try:
                if connection.can_read():
                    raise redis.ConnectionError("Connection has data")
            except _CONNECTION_ERRORS:
                connection.disconnect()
                connection.connect()
                if connection.can_read():
                    raise redis.ConnectionError("Connection not ready") from None
        except BaseException:
            self.drop()
            raise
        return connection

    def drop(self) -> None:
        """Close this thread's connection: its state is unknown after an error."""
        connection, self._local.connection = self._local.connection, None
        if connection is not None:
            connection.disconnect()

    def close(self) -> None:
        """Close every thread's connection of this channel (each reconnects on next use)."""
        with self._lock:
            made = list(self._made)
        for connection in made:
            connection.disconnect()


_channels: weakref.WeakKeyDictionary[redis.ConnectionPool, _LeanChannel] = (
    weakref.WeakKeyDictionary()
)
_channels_lock = threading.Lock()


def _channel_for(client: Any) -> _LeanChannel | None:
    """The lean channel of ``client``'s pool, or None when its calls must stay redis-py's."""
    if type(client) is not redis.Redis:
        return None
    pool = client.connection_pool
    # Exactly the plain pool: Sentinel's pool (a subclass) resolves the master per
    # connection, the blocking pool bounds connections, a cache wraps each connection.
    if type(pool) is not redis.ConnectionPool or getattr(pool, "cache", None) is not None:
        return None
    kwargs = pool.connection_kwargs
    if kwargs.get("encoding", "utf-8").lower().replace("-", "") != "utf8":
        return None  # hiredis packs text as UTF-8 only
    if str(kwargs.get("protocol") or 2) != "2":
        return None  # RESP3 may push notifications between replies
    with _channels_lock:
        channel = _channels.get(pool)
        if channel is None:
            channel = _channels[pool] = _LeanChannel(pool)
    return channel


def close_lean_connections(client: Any) -> None:
    """Close the threads' lean connections to ``client``'s server (each reconnects on its
    next call); a process's own end closes them anyway."""
    pool = getattr(client, "connection_pool", None)
    with _channels_lock:
        channel = _channels.get(pool) if pool is not None else None
    if channel is not None:
        channel.close()


def _retries(connection: Any) -> int:
    retry = getattr(connection, "retry", None)
    get_retries = getattr(retry, "get_retries", None)
    return int(get_retries()) if get_retries is not None else 0


class LeanScript(Script):
    """A ``redis.commands.core.Script`` (same arguments, same answers, usable wherever one is,
    pipelines and ``ScriptBatch`` included) whose direct calls skip redis-py's per-command
    machinery when the client allows (module docstring)."""

    def __init__(self, registered_client: Any, script: str | bytes) -> None:
        super().__init__(registered_client, script)
        self._channel = _channel_for(registered_client)

    def __call__(
        self,
        keys: Sequence[Any] | None = None,
        args: Iterable[Any] | None = None,
        client: Any = None,
    ) -> Any:
        channel = self._channel
        if channel is None or client is not None:
            return super().__call__(keys=keys, args=args, client=client)
        keys = keys or []
        args = tuple(args or ())
        try:
            packed = self._evalsha(keys, args)
        except TypeError:
            # An argument hiredis cannot pack (None, a bool...): redis-py's own error.
            return super().__call__(keys=keys, args=args)
        connection = channel.connection()
        try:
            try:
                connection.send_packed_command([packed])
                return connection.read_response()
            except NoScriptError:
                # It did not run, and its reply was read whole: load it on this connection
                # (as Script.__call__ does on the pool's) and run it.
                load: Any = ("SCRIPT", "LOAD", self.script)  # (hiredis's stub: 1-tuples only)
                connection.send_packed_command([hiredis_pack(load)])
                sha = connection.read_response()
                self.sha = sha.decode() if isinstance(sha, bytes) else str(sha)
                connection.send_packed_command([self._evalsha(keys, args)])
                return connection.read_response()
        except redis.ResponseError:
            raise  # the script's own error (or the server's): the reply was read whole
        except _CONNECTION_ERRORS:
            channel.drop()
            if _retries(connection) <= 0:
                raise
            return super().__call__(keys=keys, args=args)
        except BaseException:
            channel.drop()  # e.g. interrupted mid-reply: the next reply would be this one's
            raise

    def _evalsha(self, keys: Sequence[Any], args: tuple[Any, ...]) -> bytes:
        """The EVALSHA of this script (its current sha) on ``keys`` and ``args``, packed."""
        packed: bytes = hiredis_pack(("EVALSHA", self.sha, len(keys), *keys, *args))
        return packed


def register_lean_script(client: Any, source: str | bytes) -> Script:
    """``client.register_script(source)``, as a ``LeanScript`` (sends nothing now)."""
    return LeanScript(client, source)


def call_many(script: Script, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
    """Run ``script`` once per (keys, args) of ``calls``; each answer in order, or the
    ``ResponseError`` its run raised (the others still ran).

    A ``LeanScript`` on a lean client writes every EVALSHA in one write and reads the replies
    on the thread's connection: one round trip for all (issue 14: a poll's start and its
    outcome were a round trip each). A run Redis refused with NOSCRIPT (it did not run) is
    made again alone, which loads the script. A connection error or timeout drops the
    connection and is raised: none, some or all of the calls ran, as with a pipeline. Other
    clients (Sentinel, Cluster, a pipeline's) run the calls one by one, as ``script(...)``.
    """
    channel = script._channel if isinstance(script, LeanScript) else None
    if channel is None or len(calls) < 2 or not isinstance(script, LeanScript):
        return [_call_one(script, keys, args) for keys, args in calls]
    try:
        packed = [script._evalsha(keys, tuple(args)) for keys, args in calls]
    except TypeError:
        # An argument hiredis cannot pack: each call alone gives redis-py's own error.
        return [_call_one(script, keys, args) for keys, args in calls]
    connection = channel.connection()
    replies: list[Any] = []
    try:
        connection.send_packed_command(packed)
        for _ in packed:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:  # its reply was read whole: go on
                replies.append(exc)
    except BaseException:
        channel.drop()  # the rest of the replies are unread: the connection's state is lost
        raise
    return [
        _call_one(script, keys, args) if isinstance(reply, NoScriptError) else reply
        for reply, (keys, args) in zip(replies, calls, strict=True)
    ]


def _call_one(script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """``script(keys, args)``, its ResponseError as the answer."""
    try:
        return script(keys=keys, args=args)
    except redis.ResponseError as exc:
        return exc
