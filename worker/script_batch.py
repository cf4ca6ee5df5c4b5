"""Many Lua script calls in one round trip, on one Redis or on a Redis Cluster.

On one Redis a batch is a plain pipeline. redis-py refuses scripts in a cluster pipeline, so on
a cluster the calls are grouped by the node serving their first key's slot (every script of
paypoll touches one slot) and each group goes down one pipeline to its node, the nodes one after
another: a pass over many accounts costs one round trip per node, not one per account. A call
that the node redirects (MOVED or ASK during a reshard, TRYAGAIN while its slot is half moved,
CLUSTERDOWN) was not run there; it runs again through the cluster client, which follows the
redirection and refreshes its slot map. A redirection is the only error retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

REDIRECTIONS = (MovedError, AskError, TryAgainError, ClusterDownError)


@dataclass
class ScriptBatch:
    """Script calls to send together (:meth:`add`), run by :meth:`execute`.

    ``head``: plain commands (name, *args) that must run before any script of the batch (on one
    Redis at the head of the same pipeline; on a cluster first, in a round trip of their own).
    """

    client: redis.Redis
    head: list[tuple[Any, ...]] = field(default_factory=list)
    calls: list[tuple[Script, list[str], list[Any]]] = field(default_factory=list)

    def add(self, script: Script, keys: list[str], args: Sequence[Any]) -> None:
        """Queue ``script`` on ``keys`` (all in one hash slot) with ``args``."""
        self.calls.append((script, keys, list(args)))

    def execute(self) -> list[Any]:
        """Every call's reply, in the order added; raises the first error that is not a
        redirection (as a pipeline does)."""
        if isinstance(self.client, RedisCluster):
            return self._execute_on_cluster(self.client)
        pipe = self.client.pipeline(transaction=False)
        for command in self.head:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        for script, keys, args in self.calls:
            script(keys=keys, args=args, client=pipe)
        replies = list(pipe.execute())
        return replies[len(self.head) :]

    def _execute_on_cluster(self, cluster: RedisCluster) -> list[Any]:
        for command in self.head:
            cluster.execute_command(*command)  # type: ignore[no-untyped-call]
        by_node: dict[str, list[int]] = {}
        for index, (_script, keys, _args) in enumerate(self.calls):
            node = cluster.get_node_from_key(keys[0])  # type: ignore[no-untyped-call]
            by_node.setdefault(node.name, []).append(index)
        replies: list[Any] = [None] * len(self.calls)
        for name, indexes in by_node.items():
            node = cluster.get_node(node_name=name)  # type: ignore[no-untyped-call]
            pipe = cluster.get_redis_connection(node).pipeline(transaction=False)
            for index in indexes:
                script, keys, args = self.calls[index]
                script(keys=keys, args=args, client=pipe)
            node_lost = False
            try:
                answers = pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError):
                # The node went away (a failover): every call of its group through the cluster
                # client, which finds the slots' new owner. A script the node ran before the
                # connection broke runs twice, harmless for the batched ones: a submit is
                # idempotent, plan inputs only read, and a claim whose reply was lost leaves
                # its steps leased (the sweeper puts them back when the lease ends).
                node_lost = True
                answers = [None] * len(indexes)
            for index, answer in zip(indexes, answers, strict=True):
                if node_lost or isinstance(answer, REDIRECTIONS):
                    script, keys, args = self.calls[index]
                    answer = script(keys=keys, args=args, client=cluster)
                replies[index] = answer
        for answer in replies:
            if isinstance(answer, Exception):
                raise answer
        return replies
