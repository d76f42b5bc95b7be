"""Isolation strategies: how one tenant's data is kept apart from another's.

`Isolation` is the contract; `SchemaIsolation` gives each tenant a PostgreSQL
schema; `SQLiteFileIsolation` gives each tenant a SQLite database file (what
`isolation_strategy="schema"` means on SQLite).
"""

from .base import Isolation, storage_name
from .schema import SchemaIsolation
from .sqlite import SQLiteFileIsolation

__all__ = ["Isolation", "SQLiteFileIsolation", "SchemaIsolation", "storage_name"]
