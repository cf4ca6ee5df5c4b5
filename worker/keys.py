"""Every Redis key name paypoll uses, built in one place.

Per-account keys carry the account in a hash tag (``{acme}``): every key of one account is in
one hash slot, so every script (which touches the keys of one account only) runs on Redis
Cluster. The prefix lets deployments share one Redis.

On a cluster (``cluster=True``) the events stream cannot be written by the scripts that change
an account's payments (it is in another slot): they append to the account's own event outbox
instead, and the sweeper relays outboxes into the stream, exactly once (worker/relay.py). The
stream and the relay's cursors then share the ``{events}`` tag. On one Redis the scripts write
the stream directly and the outboxes stay empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker import defaults


@dataclass(frozen=True)
class Keys:
    """Key names under ``prefix``."""

    prefix: str = defaults.KEY_PREFIX
    cluster: bool = False
    """Keys for Redis Cluster: the events stream goes through per-account outboxes."""

    def _acct(self, account: str) -> str:
        return f"{self.prefix}:{{{account}}}"

    # --- limiter ---
    def limiter(self, account: str) -> str:
        """The account's limiter state (theoretical arrival time, penalty)."""
        return f"{self._acct(account)}:rl"

    def limiter_master(self, account: str) -> str:
        """Under Sentinel: the replication id of the master the key was last booked on."""
        return f"{self._acct(account)}:rl:master"

    # --- token cache ---
    def token(self, account: str) -> str:
        """The cached access token of an account (a string with a TTL)."""
        return f"{self._acct(account)}:token"

    def token_lock(self, account: str) -> str:
        """Held by the one process renewing an account's token."""
        return f"{self._acct(account)}:token:lock"

    # --- payment records ---
    def payment(self, account: str, reference_id: str) -> str:
        """A payment record (hash), keyed by (account, reference_id)."""
        return f"{self._acct(account)}:pay:{reference_id}"

    def by_state(self, account: str, state: str) -> str:
        """Set of reference_ids of an account currently in ``state``."""
        return f"{self._acct(account)}:state:{state}"

    def due(self, account: str, step: str) -> str:
        """Sorted set: reference_id -> when (Redis clock, s) its next ``step`` is due.

        ``step`` is ``create`` or ``track``: creates have their own set so that a tracking
        backlog never delays new payments.
        """
        return f"{self._acct(account)}:due:{step}"

    def inflight(self, account: str, step: str) -> str:
        """Sorted set: reference_id -> lease deadline of a ``step`` dispatched to the workers.

        A step still here after its lease was lost (killed worker, lost message): the sweeper
        puts it back in ``due``.
        """
        return f"{self._acct(account)}:inflight:{step}"

    def owners(self, account: str) -> str:
        """Hash: ``<step>:<reference_id>`` -> the worker process running that in-flight step.

        Written when a worker starts a step (``start_step.lua``); the sweeper puts the step
        back as due as soon as its owner stops heartbeating (``claim.lua``)."""
        return f"{self._acct(account)}:inflight:owners"

    def pending_age(self, account: str) -> str:
        """Sorted set: reference_id -> created_at (Redis clock, s) of each ``pending`` payment.

        Kept by the store's scripts on every move into or out of ``pending``: the poll planner
        counts pending payments by age with ZCOUNT (O(log N)), never by scanning them.
        """
        return f"{self._acct(account)}:pending:age"

    # --- poll planner ---
    def plan(self, account: str) -> str:
        """Hash: the account's current poll plan (threshold, budget, hazard), see worker/polling."""
        return f"{self._acct(account)}:plan"

    def completions(self, account: str) -> str:
        """Hash: age bin -> weight of observed completion ages (the learned distribution)."""
        return f"{self._acct(account)}:completions"

    def shared_slots(self, account: str) -> str:
        """Counter of limiter slots taken by other software through ``worker.api_slot``."""
        return f"{self._acct(account)}:shared"

    def not_before(self, account: str) -> str:
        """Sorted set: reference_id -> the earliest time its scheduled poll may run.

        Under the poll planner a poll may run before its planned due time when the key has
        budget to spare (an early pull), but never before this: the last poll + min gap, or
        the end of a retry's backoff. Only scheduled tracks have an entry.
        """
        return f"{self._acct(account)}:due:track:nb"

    def held(self, account: str, step: str = "track") -> str:
        """Sorted set: reference_id -> due time of a scheduled ``step`` that holds a rate-limit
        slot.

        Its call is booked already (a far slot held for it), so the sweeper claims it when
        due outside the pace (the poll planner's, or the creates') and the in-flight budget:
        pacing it again would let its slot go stale, and a stale hold books a fresh slot, one
        more booking for the same call. Each member is in ``due(account, step)`` too.
        """
        return f"{self._acct(account)}:due:{step}:held"

    def changes(self, account: str, reference_id: str) -> str:
        """Pub/sub channel: ``transition.lua`` publishes the new state of the payment on it at
        every change of state (its payment key + ``:changed``: computed in the script from
        KEYS[1], so the name must stay exactly that). ``worker.wait_for`` listens on it."""
        return f"{self.payment(account, reference_id)}:changed"

    def wake(self) -> str:
        """Pub/sub channel: a producer publishes the account of new work on it, and every
        sweeper of the fleet wakes for a pass at once instead of at its next interval."""
        return f"{self.prefix}:wake"

    def accounts(self) -> str:
        """Set of account aliases that have ever had a payment (for listing and sweeping)."""
        return f"{self.prefix}:accounts"

    def events(self) -> str:
        """Capped stream of payment state transitions for users to consume."""
        if self.cluster:
            return f"{self.prefix}:{{events}}"
        return f"{self.prefix}:events"

    def event_outbox(self, account: str) -> str:
        """Stream of the account's transitions not yet relayed to :meth:`events` (cluster)."""
        return f"{self._acct(account)}:events"

    def events_written(self, account: str) -> str:
        """Where the store's scripts append an account's transitions: the events stream on one
        Redis, the account's outbox on a cluster (the stream is in another slot there)."""
        return self.event_outbox(account) if self.cluster else self.events()

    def events_relayed(self) -> str:
        """Hash: account -> the last outbox entry id relayed into the events stream (cluster;
        in the stream's slot, so one script both appends and moves the cursor)."""
        return f"{self.prefix}:{{events}}:relayed"

    # --- webhooks (worker/webhooks/) ---
    def webhook(self, endpoint: str, part: str) -> str:
        """One key of a webhook endpoint, all under the endpoint's hash tag. ``part``:
        ``queue`` (stream of undelivered events, oldest first), ``dead`` (stream of dead
        letters), ``state`` (hash: healthy/failing/disabled, probe schedule, last error) and
        ``lease`` (the one driver of the endpoint in the fleet)."""
        return f"{self.prefix}:webhook:{{{endpoint}}}:{part}"

    def webhook_endpoints(self) -> str:
        """Set of the webhook endpoint names that have ever had an event routed to them."""
        return f"{self.prefix}:webhook:endpoints"

    def sweeper_lock(self) -> str:
        """Held by the one process running a sweep pass (with one sweeper shard)."""
        return f"{self.prefix}:sweeper:lock"

    def sweeper_shard_lock(self, shard: int, shards: int) -> str:
        """The lease of sweeper shard ``shard`` of ``shards`` (worker/shards.py), under the
        shard's own hash tag. With one shard it is :meth:`sweeper_lock`, the lock of the
        single sweeper of old, so that old and new processes exclude each other."""
        if shards == 1:
            return self.sweeper_lock()
        return f"{self.prefix}:sweeper:{{shard-{shard}}}:lock"

    def heartbeat(self) -> str:
        """Sorted set: worker process id -> last heartbeat time."""
        return f"{self.prefix}:workers"
