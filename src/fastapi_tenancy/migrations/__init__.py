"""Alembic for every tenant: the `env.py` helpers, the project template and the fleet runner.

- `env.py`: what a tenant's or the shared Alembic `env.py` calls
  (`run_tenant_migrations`, `run_shared_migrations`), and reading revisions in one query;
  its names are importable from here, as `from fastapi_tenancy.migrations import ...`.
- `template/`: the project that `fastapi-tenancy migrate init` copies (alembic.ini and the
  `migrations/shared` and `migrations/tenant` environments).

Needs the `migrations` extra (Alembic).
"""

from .env import (
    CONNECTION_ATTRIBUTE,
    DATABASE_ATTRIBUTE,
    FLEET_ATTRIBUTE,
    SCHEMA_ATTRIBUTE,
    read_database_version,
    read_versions,
    run_shared_migrations,
    run_tenant_migrations,
    tenant_schema,
)

__all__ = [
    "CONNECTION_ATTRIBUTE",
    "DATABASE_ATTRIBUTE",
    "FLEET_ATTRIBUTE",
    "SCHEMA_ATTRIBUTE",
    "read_database_version",
    "read_versions",
    "run_shared_migrations",
    "run_tenant_migrations",
    "tenant_schema",
]
