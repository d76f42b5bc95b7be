"""`fastapi-tenancy doctor`: health checks of a deployment, as an extensible list.

Each check is an async function of the manager returning a `CheckResult`. Add
one with `@doctor_check` (strategies that need their own checks, such as RLS
policies and roles, register them here):

    @doctor_check
    async def my_check(manager: TenancyManager) -> CheckResult:
        return CheckResult("my check", "ok", "all good")
"""

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa

from .config import mask_url
from .isolation.base import Isolation
from .isolation.database import DatabaseIsolation
from .isolation.hybrid import HybridIsolation
from .isolation.rls import RLSIsolation
from .isolation.schema import SchemaIsolation
from .manager import TenancyManager
from .tenant import TenantStatus

__all__ = ["CHECKS", "CheckResult", "doctor_check", "run_checks"]

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict: `fail` makes `doctor` exit with 1, `warn` does not."""

    name: str
    status: Level
    detail: str


Check = Callable[[TenancyManager], Awaitable[CheckResult]]

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
            results.append(await check(manager))
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
    """The tenant registry can be read."""
    tenants = await manager.list_tenants(limit=1000)
    more = "+" if len(tenants) == 1000 else ""
    return CheckResult("registry", "ok", f"{len(tenants)}{more} tenants")


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


def _tiers(manager: TenancyManager) -> dict[str, Isolation]:
    """The strategies the manager serves tenants with: one, or each tier of a hybrid."""
    isolation = manager.isolation
    if isinstance(isolation, HybridIsolation):
        return dict(isolation.tiers)
    return {manager.config.isolation_strategy: isolation}


@doctor_check
async def check_tenant_storage(manager: TenancyManager) -> CheckResult:
    """Every active tenant has its schema, or its database on the main server (one catalog query)."""
    if manager.config.backend != "postgresql":
        return CheckResult("tenant storage", "ok", f"not checked on {manager.config.backend}")
    tiers = _tiers(manager)
    expected: dict[str, tuple[str, str]] = {}  # storage name -> (kind, identifier)
    after: str | None = None
    while True:
        page = await manager.list_tenants(status=TenantStatus.ACTIVE, after=after, limit=1000)
        for tenant in page:
            isolation = tiers.get(tenant.tier or "") if len(tiers) > 1 else next(iter(tiers.values()))
            if isinstance(isolation, SchemaIsolation):
                expected[isolation.storage_name(tenant.identifier)] = ("schema", tenant.identifier)
            elif isinstance(isolation, DatabaseIsolation) and tenant.encrypted_database_url is None:
                expected[isolation.storage_name(tenant.identifier)] = ("database", tenant.identifier)
        if len(page) < 1000:
            break
        after = page[-1].identifier
    async with manager.engine.connect() as conn:
        found = set(
            (
                await conn.scalars(
                    sa.text(
                        "SELECT nspname FROM pg_namespace WHERE nspname = ANY(:s) "
                        "UNION ALL SELECT datname FROM pg_database WHERE datname = ANY(:s)"
                    ),
                    {"s": list(expected)},
                )
            ).all()
        )
    missing = sorted(f"{slug} ({kind})" for name, (kind, slug) in expected.items() if name not in found)
    if missing:
        return CheckResult(
            "tenant storage", "fail", f"active tenants without their storage: {', '.join(missing[:20])}"
        )
    return CheckResult(
        "tenant storage",
        "ok",
        f"all {len(expected)} active tenants with storage of their own on this server have it",
    )


@doctor_check
async def check_row_level_security(manager: TenancyManager) -> CheckResult:
    """Row-level security (`rls`, `hybrid`): every shared tenant table enabled, forced, fully covered."""
    rls = next((i for i in _tiers(manager).values() if isinstance(i, RLSIsolation)), None)
    if rls is None:
        return CheckResult("row-level security", "ok", "not used")
    problems = await rls.verify()
    if problems:
        return CheckResult("row-level security", "fail", "; ".join(problems[:20]))
    return CheckResult("row-level security", "ok", "every shared tenant table is enabled, forced and covered")


@doctor_check
async def check_template(manager: TenancyManager) -> CheckResult:
    """The template schema new tenants are cloned from exists (when `schema_template` is set)."""
    template = manager.config.schema_template
    if template is None:
        return CheckResult("template", "ok", "not configured: tenants are provisioned with create_all")
    async with manager.engine.connect() as conn:
        found = await conn.scalar(sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": template})
    if not found:
        return CheckResult(
            "template",
            "fail",
            f"schema {template!r} does not exist: registrations will fail until "
            "`fastapi-tenancy migrate upgrade` (or build_template()) creates it",
        )
    return CheckResult("template", "ok", f"schema {template!r} exists")


@doctor_check
async def check_spares(manager: TenancyManager) -> CheckResult:
    """Spare schemas (`schema_spares`): how many are ready at the template's revision."""
    pool = getattr(manager.isolation, "spares", None)
    if pool is None:
        return CheckResult("spares", "ok", "not configured: registrations clone or create their schema")
    async with manager.engine.connect() as conn:
        listed = await conn.scalar(sa.text("SELECT to_regclass('public.tenancy_spares')"))
    if listed is None:
        return CheckResult(
            "spares",
            "warn",
            "no spares table yet: start the app or run `fastapi-tenancy tenants spares fill`",
        )
    spares = await pool.list_spares()
    ready = sum(1 for s in spares if s.current)
    stale = len(spares) - ready
    detail = f"{ready} of {pool.size} ready" + (
        f", {stale} stale (dropped by the next fill)" if stale else ""
    )
    if ready < pool.size or stale:
        return CheckResult("spares", "warn", detail + "; registrations clone meanwhile")
    return CheckResult("spares", "ok", detail)
