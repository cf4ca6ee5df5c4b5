"""The events relay: on Redis Cluster, every account's event outbox moved into the events stream.

The store's scripts change an account's payments and record the change in one atomic call; on a
cluster the events stream is in another hash slot than the account, so they append the event to
the account's outbox instead (``Keys.events_written``). The sweeper, which visits every account
each pass and learns the outbox's length from its claim, relays the outboxes that hold events:
``relay.lua`` appends them to the stream and moves the account's cursor in one call on the
stream's slot, then the relayed entries are deleted from the outbox. An entry is appended once
even when the relay dies between the two steps: the next relay finds it behind the cursor and
skips it. Consumers of the stream (worker/events.py) see no difference, but an event arrives up
to one sweep interval later than on one Redis. A worker process that stops relays its accounts'
outboxes once more (:meth:`EventRelay.relay_all`), after its jobs have finished.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from worker import defaults
from worker.keys import Keys

RELAY_BATCH = 500  # outbox entries relayed per account per call


class EventRelay:
    """Relays accounts' outboxes into the events stream (see the module's docstring)."""

    def __init__(
        self, redis_client: redis.Redis, keys: Keys, *, maxlen: int = defaults.EVENTS_MAXLEN
    ) -> None:
        self.redis = redis_client
        self.keys = keys
        self.maxlen = maxlen
        self._relay = redis_client.register_script(
            Path(__file__).with_name("relay.lua").read_text(encoding="utf-8")
        )

    def relay(self, account: str, batch: int = RELAY_BATCH) -> int:
        """Move up to ``batch`` of the oldest events of ``account``'s outbox into the stream;
        how many were appended (entries relayed before and not yet deleted are not counted)."""
        outbox = self.keys.event_outbox(account)
        entries: Any = self.redis.xrange(outbox, count=batch)
        if not entries:
            return 0
        args: list[Any] = [account, self.maxlen]
        ids = []
        for entry_id, fields in entries:
            ids.append(entry_id)
            args += [entry_id, len(fields)]
            for name, value in fields.items():
                args += [name, value]
        appended = int(
            self._relay(keys=[self.keys.events(), self.keys.events_relayed()], args=args)
        )
        self.redis.xdel(outbox, *ids)
        return appended

    def relay_all(self, accounts: Iterable[str], batch: int = RELAY_BATCH) -> int:
        """Relay every event waiting in the outboxes of ``accounts``, until they are empty;
        how many were appended. One pipeline reads the outboxes' lengths (the accounts are in
        many slots: redis-py splits it per node), then only accounts with events are relayed.
        A worker process calls this as it stops, after its jobs have finished, so the events
        they wrote reach the stream now rather than at some later fleet's sweep pass. Safe
        alongside a sweeper relaying the same outboxes: ``relay.lua``'s cursor appends each
        entry once."""
        names = list(accounts)
        if not names:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for account in names:
            pipe.xlen(self.keys.event_outbox(account))
        lengths = pipe.execute()
        appended = 0
        for account, length in zip(names, lengths, strict=True):
            if not length:
                continue
            # Bounded: each call deletes what it read; events still being written by another
            # process's jobs are left to that process or the sweeper.
            for _ in range(int(length) // batch + 1):
                appended += self.relay(account, batch)
        return appended
