"""Isolation strategies: how one tenant's data is kept apart from another's.

`Isolation` is the contract; `SchemaIsolation` gives each tenant a PostgreSQL
schema; `SQLiteFileIsolation` gives each tenant a SQLite database file (what
`isolation_strategy="schema"` means on SQLite); `RLSIsolation` keeps tenants in shared
tables under row-level security; `HybridIsolation` places each tenant in a tier.
"""

from .base import Isolation, storage_name
from .hybrid import HybridIsolation
from .rls import RLSIsolation
from .schema import SchemaIsolation
from .sqlite import SQLiteFileIsolation

__all__ = [
    "HybridIsolation",
    "Isolation",
    "RLSIsolation",
    "SQLiteFileIsolation",
    "SchemaIsolation",
    "storage_name",
]
