"""Isolation strategies: how one tenant's data is kept apart from another's.

`Isolation` is the contract; `SchemaIsolation` gives each tenant a PostgreSQL
schema; `DatabaseIsolation` gives each tenant a database of its own (PostgreSQL,
MySQL/MariaDB); `SQLiteFileIsolation` gives each tenant a SQLite database file (what
both strategies mean on SQLite); `RLSIsolation` keeps tenants in shared tables under
row-level security; `HybridIsolation` places each tenant in a tier. `EngineRegistry`
and `ConnectionBudget` hold the per-tenant engines of the database and file strategies.
Helpers of the schema strategy: `clone` (a tenant schema cloned from the template) and
`spares` (clones made ahead of time), `roles` (a database role per tenant schema,
`schema_tenant_roles`); `_begin` sends tenant settings with `BEGIN`;
`_incarnation` binds storage to the id of the tenant it was made for (`marker_name`).
"""

from ._engines import ConnectionBudget, EngineRegistry
from .base import Isolation, marker_name, storage_name
from .database import DatabaseIsolation
from .hybrid import HybridIsolation
from .rls import RLSIsolation
from .schema import SchemaIsolation
from .sqlite import SQLiteFileIsolation

__all__ = [
    "ConnectionBudget",
    "DatabaseIsolation",
    "EngineRegistry",
    "HybridIsolation",
    "Isolation",
    "RLSIsolation",
    "SQLiteFileIsolation",
    "SchemaIsolation",
    "marker_name",
    "storage_name",
]
