"""Application caches scoped to a tenant: `TenantCache` over a memory or Redis backend.

`RedisCacheBackend` lives in `fastapi_tenancy.cache.redis` (it imports redis-py).
"""

from .base import CacheBackend, TenantCache
from .memory import MemoryCacheBackend

__all__ = ["CacheBackend", "MemoryCacheBackend", "TenantCache"]
