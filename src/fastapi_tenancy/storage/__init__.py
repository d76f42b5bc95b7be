"""Tenant registries: where the list of tenants and their status is kept.

`TenantStore` is the contract (subclass it for a custom store); `InMemoryTenantStore`
suits tests; `SQLAlchemyTenantStore` (in `fastapi_tenancy.storage.database`) keeps the
registry in PostgreSQL, SQLite or MySQL/MariaDB, `RedisTenantStore`
(`fastapi_tenancy.storage.redis`) in Redis. `CachingTenantStore`
(`fastapi_tenancy.storage.caching`) puts a Redis cache in front of any of them. The last
two need the `redis` extra, so they are not imported here.
"""

from .base import TenantStore
from .memory import InMemoryTenantStore

__all__ = ["InMemoryTenantStore", "TenantStore"]
