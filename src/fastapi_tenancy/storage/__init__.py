"""Tenant registries: where the list of tenants and their status is kept.

`TenantStore` is the contract (subclass it for a custom store); `InMemoryTenantStore`
suits tests; `SQLAlchemyTenantStore` (in `fastapi_tenancy.storage.database`) keeps the
registry in PostgreSQL, SQLite or MySQL/MariaDB.
"""

from .base import TenantStore
from .memory import InMemoryTenantStore

__all__ = ["InMemoryTenantStore", "TenantStore"]
