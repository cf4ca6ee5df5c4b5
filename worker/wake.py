"""Wake the sweeper when a producer records new work, instead of waiting for its next pass.

Producers publish the account on ``Keys.wake()`` after a submit (``Producer.wake``). Each
worker process runs one ``WakeListener``: a thread subscribed to that channel that sets an
event the sweeper's loop waits on. Pub/sub keeps nothing, so this is only a shortcut: a wake
lost to a reconnect costs one sweep interval, never a payment (the work is in Redis).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis
import structlog

log = structlog.get_logger("paypoll.wake")

RECONNECT_PAUSE = 1.0  # seconds between two subscription attempts while Redis is away
LISTEN_TIMEOUT = 1.0  # seconds a read may block, so stop() is seen promptly


class WakeListener(threading.Thread):
    """Sets ``event`` whenever a producer publishes on ``channel`` an account that ``accept``
    takes (default: every one; the sweeper: those of the shards it leads), until ``stop()``."""

    def __init__(
        self,
        redis_client: redis.Redis,
        channel: str,
        event: threading.Event,
        *,
        accept: Callable[[str], bool] = lambda account: True,
    ) -> None:
        super().__init__(name="paypoll-wake", daemon=True)
        self.redis = redis_client
        self.channel = channel
        self.event = event
        self.accept = accept
        self.stopping = threading.Event()
        self.subscribed = threading.Event()  # set while a subscription is live (for tests)
        self._accounts: set[str] = set()
        self._accounts_lock = threading.Lock()

    def take_accounts(self) -> set[str]:
        """The accounts woken since the last call (what producers published), cleared."""
        with self._accounts_lock:
            taken, self._accounts = self._accounts, set()
        return taken

    def stop(self) -> None:
        """Finish within about LISTEN_TIMEOUT."""
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
            try:
                pubsub.subscribe(self.channel)
                self.subscribed.set()
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=LISTEN_TIMEOUT)
                    if message is not None:
                        data = message.get("data")
                        if isinstance(data, bytes | str):
                            account = data.decode() if isinstance(data, bytes) else data
                            if not self.accept(account):
                                continue  # another shard's: its leader wakes for it
                            with self._accounts_lock:
                                self._accounts.add(account)
                        self.event.set()
            except redis.RedisError as exc:
                self.subscribed.clear()
                log.warning("wake.redis_unavailable", error=str(exc))
                self.stopping.wait(RECONNECT_PAUSE)
            finally:
                self.subscribed.clear()
                pubsub.close()
