"""The global per-API-key rate limiter (Redis + Lua): see ``limiter.py``."""

from worker.ratelimit.limiter import RateLimiter, Reservation

__all__ = ["RateLimiter", "Reservation"]
