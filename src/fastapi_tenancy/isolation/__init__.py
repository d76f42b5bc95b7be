"""Isolation strategies: how one tenant's data is kept apart from another's.

`Isolation` is the contract; `SchemaIsolation` gives each tenant a PostgreSQL
schema; `DatabaseIsolation` gives each tenant a database of its own (PostgreSQL,
MySQL/MariaDB); `SQLiteFileIsolation` gives each tenant a SQLite database file (what
both strategies mean on SQLite). `EngineRegistry` and `ConnectionBudget` hold the
per-tenant engines of the latter two.
"""

from .base import Isolation, storage_name
from .database import DatabaseIsolation
from .engines import ConnectionBudget, EngineRegistry
from .schema import SchemaIsolation
from .sqlite import SQLiteFileIsolation

__all__ = [
    "ConnectionBudget",
    "DatabaseIsolation",
    "EngineRegistry",
    "Isolation",
    "SQLiteFileIsolation",
    "SchemaIsolation",
    "storage_name",
]
