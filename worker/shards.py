"""Sweeper shards: which accounts each sweeper leader drives, and which shards a process leads.

Accounts are split among ``PAYPOLL_SWEEPER_SHARDS`` shards by the Redis Cluster hash slot of
their keys (every key of an account carries the account as its hash tag, worker/keys.py): shard
``i`` of ``n`` holds the slots ``[i * 16384 / n, (i + 1) * 16384 / n)``, contiguous ranges, so a
shard can later follow the slots of one cluster node. Each shard has its own lease
(``Keys.sweeper_shard_lock``), held by at most one process, whose SweeperThread runs that
shard's passes (worker/sweeper.py).

Which shards a process tries to lead is decided by :func:`plan_leases`, a pure function of what
the process sees in Redis: the holder of every shard's lease and the live processes (heartbeats
within ``dead_after``). A process takes free shards up to its fair share, ``ceil(shards /
live)``; one that holds two more than another live process gives one back per check, which the
other takes (so a fleet that grows spreads its shards: each process ends with the floor or the
ceiling of shards / live); and any shard free for longer than a grace is taken by whoever sees
it (so a shard whose leader died is led again as soon as its lease lapses, even while the dead
process still counts as live).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from worker.keys import Keys

FREE_GRACE = 1.0  # seconds a shard must stay free before a process at its fair share takes it


def shard_of(keys: Keys, account: str, shards: int) -> int:
    """The shard of ``account``: its keys' hash slot scaled to ``shards`` contiguous ranges."""
    if shards == 1:
        return 0
    slot = key_slot(keys.due(account, "track").encode())
    return slot * shards // REDIS_CLUSTER_HASH_SLOTS


def partition(keys: Keys, accounts: Iterable[str], shards: int) -> dict[int, list[str]]:
    """Every shard (0 .. shards - 1, empty ones too) -> its accounts, in the given order."""
    split: dict[int, list[str]] = {shard: [] for shard in range(shards)}
    for account in accounts:
        split[shard_of(keys, account, shards)].append(account)
    return split


def preference(identity: str, shards: int) -> list[int]:
    """The order in which process ``identity`` prefers shards (rendezvous hashing): different
    processes prefer different shards, so free shards spread without coordination."""
    return sorted(range(shards), key=lambda s: zlib.crc32(f"{identity}/{s}".encode()))


@dataclass(frozen=True)
class LeasePlan:
    """What one check decided: shards to try to take, and shards to give back."""

    take: tuple[int, ...]
    release: tuple[int, ...]
    fair_share: int


def plan_leases(
    *,
    identity: str,
    shards: int,
    holders: Mapping[int, str | None],
    live: Collection[str],
    free_for: Mapping[int, float],
    grace: float = FREE_GRACE,
) -> LeasePlan:
    """Which shards ``identity`` should take and give back, from the lease holders it read
    (shard -> holder, None when free), the live processes and, per free shard, how long this
    process has seen it free (seconds)."""
    alive = set(live) | {identity}
    fair = math.ceil(shards / len(alive))
    order = preference(identity, shards)
    mine = [s for s in order if holders.get(s) == identity]
    free = [s for s in order if holders.get(s) is None]
    take: list[int] = []
    for shard in free:
        if len(mine) + len(take) < fair or free_for.get(shard, 0.0) >= grace:
            take.append(shard)
    release: tuple[int, ...] = ()
    others = {p: 0 for p in alive if p != identity}
    for holder in holders.values():
        if holder in others:
            others[holder] += 1
    if not free and others and len(mine) >= min(others.values()) + 2:
        # Two more than the least loaded live process: give one back (the least preferred;
        # one per check), which that process, below its fair share, takes at its next check.
        release = (mine[-1],)
    return LeasePlan(take=tuple(take), release=release, fair_share=fair)
