"""The global per-API-key rate limiter (Redis + Lua): see ``limiter.py``."""

from worker.ratelimit.limiter import RateLimiter
from worker.ratelimit.reservation import Reservation

__all__ = ["RateLimiter", "Reservation"]
