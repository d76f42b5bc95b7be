"""Per-tenant rate limiting: one GCRA limiter per backend.

`RateLimiter` (base) holds the policy (limits from the config, overridden by the
tenant's plan or metadata) and the fail-open/fail-closed rule; `MemoryRateLimiter`
counts in process memory (one process: the embedded default); `RedisRateLimiter`
(in `fastapi_tenancy.ratelimit.redis`) counts in Redis, shared by every worker.
"""

from .base import RateLimitDecision, RateLimiter, RateLimitUsage
from .memory import MemoryRateLimiter

__all__ = ["MemoryRateLimiter", "RateLimitDecision", "RateLimitUsage", "RateLimiter"]
