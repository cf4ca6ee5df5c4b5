"""Runtime: the objects one paypoll process works with, built once from Settings."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from redis import Redis

from worker.api.client import ApiClient
from worker.connection import connect_redis, is_sentinel
from worker.keys import Keys
from worker.poll_start import PollStarter
from worker.polling.store import PlanCache, PlanStore
from worker.polling.timer import PollTimer
from worker.ratelimit import RateLimiter
from worker.schedule import PollSchedule
from worker.settings import Settings
from worker.store import PaymentStore


@dataclass
class Runtime:
    """Settings plus the Redis client, store, limiter, API client and schedule built on them."""

    settings: Settings
    redis: Redis
    keys: Keys
    store: PaymentStore
    limiter: RateLimiter
    client: ApiClient
    schedule: PollSchedule
    plans: PlanStore
    timer: PollTimer
    polls: PollStarter
    """Starts track steps with their GET's slot booked in the same round trip."""
    rng: random.Random = field(default_factory=random.Random)
    identity: str = ""
    """This process's name in the heartbeat set: the owner of the steps it starts ("" for a
    process that runs no steps)."""

    @classmethod
    def build(cls, settings: Settings, *, redis_client: Redis | None = None) -> Runtime:
        """Everything a worker or producer process needs, sharing one connection pool."""
        client = redis_client if redis_client is not None else connect_redis(settings.redis_url)
        keys = settings.keys()
        limiter = RateLimiter(
            redis=client,
            keys=keys,
            margin=settings.rate_margin,
            max_wait=settings.max_wait,
            max_ahead=settings.max_ahead,
            penalty_default=settings.penalty_default,
            watch_master=is_sentinel(settings.redis_url),
        )
        schedule = PollSchedule(
            first_delay=settings.poll_first_delay,
            factor=settings.poll_factor,
            max_delay=settings.poll_max_delay,
            tracking_timeout=settings.tracking_timeout,
            jitter=settings.poll_jitter,
        )
        plans = PlanStore(redis=client, keys=keys)
        polls = PollStarter(redis_client=client, keys=keys, limiter=limiter)
        rng = random.Random()
        return cls(
            settings=settings,
            redis=client,
            keys=keys,
            store=PaymentStore(redis=client, keys=keys, events_maxlen=settings.events_maxlen),
            limiter=limiter,
            client=ApiClient(settings=settings, redis=client, limiter=limiter, keys=keys),
            schedule=schedule,
            plans=plans,
            timer=PollTimer(settings=settings, schedule=schedule, plans=PlanCache(plans), rng=rng),
            polls=polls,
            rng=rng,
        )
