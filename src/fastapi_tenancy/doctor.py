"""`fastapi-tenancy doctor`: health checks of a deployment, as an extensible list.

Each check is an async function of the manager returning a `CheckResult` (or a
list of them). Add one with `@doctor_check`. Isolation strategies bring their own
checks (RLS policies, the template schema, spares) through `Isolation.diagnose()`,
which `check_isolation` runs for every strategy in use:

    @doctor_check
    async def my_check(manager: TenancyManager) -> CheckResult:
        return CheckResult("my check", "ok", "all good")
"""

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa

from .errors import TenancyUnavailableError
from .invalidation.record import mismatch, own_record, read_channel
from .isolation.base import marker_name
from .manager import TenancyManager
from .tenant import TenantStatus
from .urls import mask_url

__all__ = ["CHECKS", "CheckResult", "doctor_check", "run_checks"]

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict: `fail` makes `doctor` exit with 1, `warn` does not."""

    name: str
    status: Level
    detail: str


Check = Callable[[TenancyManager], Awaitable[CheckResult | list[CheckResult]]]

CHECKS: list[Check] = []
"""The checks `doctor` runs, in order."""


def doctor_check(check: Check) -> Check:
    """Register `check` to run in `doctor` (a decorator)."""
    CHECKS.append(check)
    return check


async def run_checks(manager: TenancyManager) -> list[CheckResult]:
    """Run every registered check; a check that raises is reported as failed, not propagated."""
    results = []
    for check in CHECKS:
        try:
            result = await check(manager)
            results.extend(result if isinstance(result, list) else [result])
        except Exception as exc:
            name = check.__name__.removeprefix("check_").replace("_", " ")
            results.append(CheckResult(name, "fail", f"{type(exc).__name__}: {exc}"))
    return results


@doctor_check
async def check_configuration(manager: TenancyManager) -> CheckResult:
    """The settings in force, as read from arguments and TENANCY_* variables."""
    config = manager.config
    return CheckResult(
        "configuration",
        "ok",
        f"{config.backend} at {mask_url(config.database_url)}, isolation={config.isolation_strategy}, "
        f"pgbouncer={config.database_pgbouncer}",
    )


@doctor_check
async def check_connectivity(manager: TenancyManager) -> CheckResult:
    """A round trip to the database, timed."""
    started = time.perf_counter()
    async with manager.engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
    return CheckResult("connectivity", "ok", f"SELECT 1 in {(time.perf_counter() - started) * 1000:.1f} ms")


@doctor_check
async def check_registry(manager: TenancyManager) -> CheckResult:
    """The tenant registry can be read (and is ours: not a 0.5.0 or a foreign table)."""
    problem = await manager.store.problem()
    if problem is not None:
        return CheckResult("registry", "fail", problem)
    tenants = await manager.list_tenants(limit=1000)
    more = "+" if len(tenants) == 1000 else ""
    return CheckResult("registry", "ok", f"{len(tenants)}{more} tenants")


@doctor_check
async def check_invalidation_channel(manager: TenancyManager) -> CheckResult:
    """This process uses the invalidation channel the registry records for its processes.

    Reads the record and writes nothing; `manager.initialize()` refuses to start a
    process that fails this check.
    """
    own = own_record(manager.invalidation)
    try:
        recorded = await read_channel(manager.store)
    except TenancyUnavailableError:
        raise
    except Exception as exc:  # e.g. the table, made by this version's first start, is not there yet
        return CheckResult(
            "invalidation channel",
            "warn",
            f"no record read ({type(exc).__name__}); this process uses {own.describe()}",
        )
    if recorded is None:
        return CheckResult(
            "invalidation channel",
            "ok",
            f"none recorded yet: the first process to start records its own; this one uses {own.describe()}",
        )
    problem = mismatch(recorded, own)
    if problem is not None:
        return CheckResult("invalidation channel", "fail", problem)
    return CheckResult(
        "invalidation channel",
        "ok",
        f"{recorded.describe()}, recorded {recorded.recorded_at} by {recorded.recorded_by}",
    )


@doctor_check
async def check_pooler_safety(manager: TenancyManager) -> CheckResult:
    """Connections start with the empty search_path the manager asks for at connect.

    A transaction-mode pooler (PgBouncer) drops startup parameters, which shows
    here. Without `TENANCY_DATABASE_PGBOUNCER=true` the manager's own connections
    would then resolve unqualified names in `public`, and asyncpg's named prepared
    statements would meet other clients' on shared server connections.
    """
    if manager.config.backend != "postgresql":
        return CheckResult("pooler safety", "ok", f"not applicable to {manager.config.backend}")
    async with manager.engine.connect() as conn:
        search_path = await conn.scalar(sa.text("SELECT current_setting('search_path')"))
    if manager.config.database_pgbouncer:
        return CheckResult("pooler safety", "ok", "pgbouncer mode: no cached prepared statements")
    if search_path not in ("", '""'):
        return CheckResult(
            "pooler safety",
            "fail",
            f"new connections have search_path={search_path!r}, not the empty one requested at connect: "
            "a pooler is dropping startup parameters; set TENANCY_DATABASE_PGBOUNCER=true",
        )
    return CheckResult("pooler safety", "ok", "connections start with an empty search_path")


# Each expected schema or database that exists; for a schema, whether it holds a table
# (other than Alembic's version table: an empty one answers every request with an error),
# and the incarnation markers it holds (a database's are inside it).
_STORAGE = sa.text(
    "SELECT n.nspname AS name, EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid "
    "AND c.relkind IN ('r', 'p') AND c.relname <> 'alembic_version') AS has_tables, "
    "ARRAY(SELECT c.relname::text FROM pg_class c WHERE c.relnamespace = n.oid AND c.relkind = 'v' "
    "AND c.relname LIKE 'fastapi\\_tenancy:%') AS markers "
    "FROM pg_namespace n WHERE n.nspname = ANY(:s) "
    "UNION ALL SELECT datname, true, NULL FROM pg_database WHERE datname = ANY(:s)"
)


@doctor_check
async def check_tenant_storage(manager: TenancyManager) -> CheckResult:
    """Every active tenant has its schema (holding tables and its marker), or its database
    on the main server.

    One catalog query. A tenant schema with no table at all (registered without
    `app_metadata`, a template or migrations) fails: each of its requests would; so does
    one without its tenant's incarnation marker (refused until `adopt_storage`).
    """
    if manager.config.backend != "postgresql":
        return CheckResult("tenant storage", "ok", f"not checked on {manager.config.backend}")
    isolation = manager.isolation
    expected: dict[str, tuple[str, str, str]] = {}  # storage name -> (kind, identifier, tenant id)
    async for tenant in manager.store.iterate(status=TenantStatus.ACTIVE):
        storage = isolation.expected_storage(tenant)
        if storage is not None:
            expected[storage[1]] = (storage[0], tenant.identifier, tenant.id)
    async with manager.engine.connect() as conn:
        found = {row.name: row for row in await conn.execute(_STORAGE, {"s": list(expected)})}
    missing = sorted(f"{slug} ({kind})" for name, (kind, slug, _) in expected.items() if name not in found)
    if missing:
        return CheckResult(
            "tenant storage", "fail", f"active tenants without their storage: {', '.join(missing[:20])}"
        )
    empty = sorted(slug for name, (_, slug, _) in expected.items() if not found[name].has_tables)
    if empty:
        return CheckResult(
            "tenant storage",
            "fail",
            f"active tenants whose schema holds no table: {', '.join(empty[:20])} (their tables were "
            "never created: run the migrations, `fastapi-tenancy migrate upgrade` with alembic_config)",
        )
    unmarked = sorted(
        slug
        for name, (kind, slug, tenant_id) in expected.items()
        if kind == "schema" and list(found[name].markers or ()) != [marker_name(tenant_id)]
    )
    if unmarked:
        return CheckResult(
            "tenant storage",
            "fail",
            "schemas not marked as their tenant's (refused until `TenancyManager.adopt_storage`, "
            f"or another tenant's): {', '.join(unmarked[:20])}",
        )
    return CheckResult(
        "tenant storage",
        "ok",
        f"all {len(expected)} active tenants with storage of their own on this server have it",
    )


@doctor_check
async def check_migrations(manager: TenancyManager) -> CheckResult:
    """With `alembic_config`: every tenant (and the template, its spares, the rls tables) at head.

    Reads the revisions as `fastapi-tenancy migrate status` does (one catalog query for
    schemas; one connection per tenant database).
    """
    path = manager.config.alembic_config
    if path is None:
        return CheckResult("migrations", "ok", "not configured (alembic_config): revisions are not checked")
    from .migrations.fleet import FleetMigrator  # needs Alembic, which alembic_config implies

    migrator = FleetMigrator(manager, path)
    try:
        rows = await migrator.status("head")
    finally:
        await migrator.close()
    unversioned = [m.tenant for m in rows if not m.at_target and not m.versions]
    behind = [f"{m.tenant} ({','.join(m.versions or ())})" for m in rows if not m.at_target and m.versions]
    if unversioned or behind:
        problems = []
        if unversioned:
            problems.append(f"no revision (never migrated nor stamped): {', '.join(unversioned[:20])}")
        if behind:
            problems.append(f"not at head: {', '.join(behind[:20])}; run `fastapi-tenancy migrate upgrade`")
        return CheckResult("migrations", "fail", "; ".join(problems))
    return CheckResult("migrations", "ok", f"all {len(rows)} at head")


@doctor_check
async def check_isolation(manager: TenancyManager) -> list[CheckResult]:
    """The checks each isolation strategy in use brings (RLS policies, the template, spares...)."""
    results: list[CheckResult] = []
    for part in manager.isolation.parts():
        for finding in await part.diagnose():
            # Once: hybrid's schema and rls tiers report the Citus cluster they share.
            if CheckResult(*finding) not in results:
                results.append(CheckResult(*finding))
    return results
