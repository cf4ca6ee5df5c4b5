"""The events relay: on Redis Cluster, every account's event outbox moved into the events stream.

The store's scripts change an account's payments and record the change in one atomic call; on a
cluster the events stream is in another hash slot than the account, so they append the event to
the account's outbox instead (``Keys.events_written``). The sweeper, which visits every account
each pass and learns the outbox's length from its claim, relays the outboxes that hold events:
``relay.lua`` appends them to the stream and moves the account's cursor in one call on the
stream's slot, then the relayed entries are deleted from the outbox. An entry is appended once
even when the relay dies between the two steps: the next relay finds it behind the cursor and
skips it. Consumers of the stream (worker/events.py) see no difference, but an event arrives up
to one sweep interval later than on one Redis.
"""

from __future__ import annotations

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
