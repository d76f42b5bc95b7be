"""Where a tenant's migrations run: its schema, its own database, or the tables tenants share.

Every path that touches a tenant's Alembic version (the fleet runner, stamping at
registration, `doctor`, an `env.py` run for one tenant) asks `migration_target()`, so they
agree on the place and the version table:

| the tenant's strategy | migrated in | version table |
|---|---|---|
| schema (or a hybrid schema tier) | its schema on the main database | `<schema>.alembic_version` |
| database (or a hybrid database tier) | its own database, default schema | `alembic_version` |
| rls (or a hybrid rls tier) | the shared schema, once for every tenant | `public.alembic_version_rls` |

Tenants under row-level security share their tables, so they share one migration and one
version table, kept apart from the shared environment's `public.alembic_version`.
"""

from dataclasses import dataclass

from ..config import TenancyConfig
from ..isolation.base import Isolation
from ..tenant import Tenant

__all__ = [
    "RLS_VERSION_TABLE",
    "VERSION_TABLE",
    "MigrationTarget",
    "library_tables",
    "migration_target",
]

VERSION_TABLE = "alembic_version"
"""Alembic's version table: in each tenant schema, each tenant database, and `public` (shared)."""

RLS_VERSION_TABLE = "alembic_version_rls"
"""The version table of the tables tenants share under row-level security, in their schema."""


@dataclass(frozen=True)
class MigrationTarget:
    """Where one tenant's migrations run, and the version table that says how far they got."""

    name: str
    """The schema on the main database, or the tenant's own database."""
    url: str | None = None
    """The tenant's own database (password included), or None: a schema of the main database."""
    version_table: str = VERSION_TABLE
    shared: bool = False
    """True when every tenant of its strategy has this same target (row-level security)."""

    @property
    def schema(self) -> str | None:
        """The schema to scope the migration to; None in a tenant's own database."""
        return None if self.url is not None else self.name


def migration_target(isolation: Isolation, tenant: Tenant) -> MigrationTarget:
    """Where `tenant`'s migrations run under `isolation` (hybrid isolation: its tier's)."""
    url = isolation.migration_url(tenant)
    part = isolation.serving(tenant)
    if url is not None:
        return MigrationTarget(url.database or "", url.render_as_string(hide_password=False))
    name = part.storage_name(tenant.identifier)
    if part.shared_column is not None:
        return MigrationTarget(name, version_table=RLS_VERSION_TABLE, shared=True)
    return MigrationTarget(name)


def library_tables(config: TenancyConfig) -> frozenset[str]:
    """The tables the library keeps in `public` beside shared tables (autogenerate leaves them alone).

    The registry under its default name (with its settings, the invalidation channel it
    records, and its custom domains), the audit log, the spares list, the fleet's results,
    the row-level security fence, and both version tables.
    """
    return frozenset(
        {
            "tenants",
            "tenants_settings",
            "tenants_domains",
            "tenancy_audit_log",
            "tenancy_spares",
            "tenancy_migration_runs",
            "tenancy_migration_results",
            f"{config.rls_setting_namespace}_tenant_fence",
            VERSION_TABLE,
            RLS_VERSION_TABLE,
        }
    )
