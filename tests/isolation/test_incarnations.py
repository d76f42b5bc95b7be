"""Tenant incarnations: a request of tenant `reuse` is in flight while the tenant is deleted
with its data and the slug registered again for a new customer, who writes a row. Whatever
the strategy, the old incarnation never reads or writes the new one's rows: destruction
waits for its open transaction (or ends it), a transaction it begins afterwards is refused
at BEGIN (PostgreSQL) or at connect (MariaDB, SQLite), and so is every request of a process
whose cache still holds it. Alpha and beta, with overlapping primary keys, keep their rows."""

import asyncio
import itertools
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from fastapi_tenancy import (
    ProvisioningError,
    TenancyConfig,
    TenancyManager,
    TenancyUnavailableError,
    Tenant,
    TenantNotFoundError,
    TenantStatus,
)
from fastapi_tenancy.cache import TenantCache
from fastapi_tenancy.cache.redis import RedisCacheBackend
from fastapi_tenancy.doctor import run_checks
from fastapi_tenancy.isolation import (
    DatabaseIsolation,
    RLSIsolation,
    SchemaIsolation,
    SQLiteFileIsolation,
    _incarnation,
)
from fastapi_tenancy.isolation.base import marker_name
from fastapi_tenancy.storage.caching import CachingTenantStore
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

from ..apps import Base, build_app
from ..conftest import _postgres_admin, running_pgbouncer
from .test_matrix import HYBRID_DATABASE, TENANT_ROLES, Env, _environment, _setup, two_tenants

# name -> (the matrix setup, the tiers of the old and the new incarnation under hybrid)
CASES: dict[str, tuple[str, tuple[str, str] | None]] = {
    "schema": ("postgres", None),
    "schema-roles": (TENANT_ROLES, None),
    # Distributed schemas on a Citus coordinator: the marker a local view there, the rows on a worker.
    "citus-schema": ("citus", None),
    "rls": ("rls", None),
    "hybrid-schema": ("hybrid", ("schema", "schema")),
    "hybrid-rls": ("hybrid", ("rls", "rls")),
    "hybrid-schema-then-rls": ("hybrid", ("schema", "rls")),
    "hybrid-rls-then-schema": ("hybrid", ("rls", "schema")),
    "database-postgres": ("postgres-database", None),
    "database-mariadb": ("mysql-database", None),
    "hybrid-database": (HYBRID_DATABASE, ("database", "database")),
    "sqlite": ("sqlite", None),
}
# How destruction treats the old incarnation's open transaction: waits for it (its lock),
# ends its connection (a database dropped with its connections), or leaves it on the
# unlinked file (SQLite).
LOCKED, ENDED, UNLINKED = "locked", "ended", "unlinked"


@dataclass
class Case:
    env: Env
    name: str
    old_storage: str
    """LOCKED, ENDED or UNLINKED: what the old incarnation's storage is."""


def _old_storage(name: str) -> str:
    if name.startswith("database") or name == "hybrid-database":
        return ENDED
    return UNLINKED if name == "sqlite" else LOCKED


@pytest.fixture(params=list(CASES))
def case_setup(request: pytest.FixtureRequest) -> tuple[str, str, dict[str, Any]]:
    url, settings = _setup(request, CASES[request.param][0])
    # Room for the deletion's own connection (and a second old session) beside the old request.
    return request.param, url, {**settings, "database_pool_size": 4}


@pytest.fixture
async def case(case_setup: tuple[str, str, dict[str, Any]]) -> AsyncIterator[Case]:
    name, url, settings = case_setup
    async with _environment(url, settings) as env:
        tiers = CASES[name][1]
        if tiers is not None:
            env.tiers = itertools.cycle(tiers)  # the old incarnation, then the new one
        yield Case(env, name, _old_storage(name))


async def _descriptions(session: Any, env: Env) -> list[str]:
    rows = (await session.execute(sa.select(env.model.description).order_by(env.model.id))).scalars()
    return list(rows)


async def _others_intact(env: Env) -> None:
    for tenant, rows in (("alpha", ["alpha-1", "alpha-2"]), ("beta", ["beta-1", "beta-3"])):
        async with env.manager.session(await env.manager.get_tenant(tenant)) as session:
            assert await _descriptions(session, env) == rows


REFUSED = (TenantNotFoundError, TenancyUnavailableError)


async def _read(session: Any, env: Env) -> list[str] | BaseException:
    """The old request's read: the rows it saw, or why it was refused (rolled back)."""
    try:
        return await asyncio.wait_for(_descriptions(session, env), 10)
    except (*REFUSED, sa_exc.DBAPIError) as exc:
        await session.rollback()
        return exc


async def _old_request_meets_the_deletion(env: Env, old_storage: str) -> None:
    """The race of the issue: an old request in flight across delete, re-register and a write."""
    manager = env.manager
    await env.seed("reuse", {1: "old-1", 2: "old-2"})
    old = await manager.get_tenant("reuse")

    async def replace() -> None:  # the tenant deleted with its data; a new customer takes the slug
        await manager.delete_tenant(old, destroy_data=True)
        await env.seed("reuse", {1: "new-1"})

    async with manager.session(old) as session:
        await session.execute(sa.text("SELECT 1"))  # its transaction has begun, and touched no table
        replacement = asyncio.create_task(replace())
        await asyncio.sleep(0.5)
        # The old request reads and writes in its open transaction.
        seen = await _read(session, env)
        assert isinstance(seen, BaseException) or "new-1" not in seen, "the old request read the new rows"
        if not isinstance(seen, BaseException):
            session.add(env.model(id=3, description="old-3"))  # a slow write of the old request
            await session.commit()
        if old_storage == LOCKED:
            # Destruction waited for the open transaction: DROP SCHEMA alone would not (it
            # has touched no table), nor would row-level security's DELETE.
            assert seen == ["old-1", "old-2"]
        elif old_storage == ENDED:
            # The database went with its connections (PostgreSQL: FORCE, MariaDB: KILL).
            assert isinstance(seen, BaseException), seen
        else:
            # The open file outlives its unlink: the old request read its own rows, and wrote
            # where nobody will read again.
            assert seen == ["old-1", "old-2"]
        await asyncio.wait_for(replacement, 30)
        new = await manager.get_tenant("reuse")
        assert new.id != old.id

        # The old request goes on, in a new transaction: refused, never the new rows.
        seen = await _read(session, env)
        assert isinstance(seen, REFUSED), seen
        session.add(env.model(id=9, description="old-late"))  # a slow write, after the re-registration
        with pytest.raises(REFUSED):
            await session.commit()
        await session.rollback()

    async with manager.session(new) as session:
        assert await _descriptions(session, env) == ["new-1"]
    await _others_intact(env)


async def test_an_old_request_never_reaches_the_new_incarnation(case: Case) -> None:
    await _old_request_meets_the_deletion(case.env, case.old_storage)
    if case.env.strategy in ("rls", "hybrid"):
        # Nothing of the old incarnation is left in the shared tables either.
        await _no_rows_of_deleted_tenants(case.env)


async def _no_rows_of_deleted_tenants(env: Env) -> None:
    assert env.manager.config.database_owner_url is not None
    known = [(await env.manager.get_tenant(slug)).id for slug in ("alpha", "beta", "reuse")]
    admin = await _postgres_admin(_admin_url(env))
    try:
        rows = await admin.fetch("SELECT tenant_id, description FROM public.orders")
    finally:
        await admin.close()
    assert [tuple(row) for row in rows if row[0] not in known] == []


def _admin_url(env: Env) -> str:
    # The superuser of the test database: it sees past row-level security.
    owner = make_url(env.manager.config.database_owner_url or "")
    return owner.set(username="postgres").render_as_string(hide_password=False)


async def _begin(session: Any) -> BaseException | None:
    try:
        await session.execute(sa.text("SELECT 1"))
    except (*REFUSED, sa_exc.DBAPIError) as exc:
        await session.rollback()
        return exc
    return None


async def _begun_while_destruction_waits(env: Env) -> None:
    """A transaction of the old incarnation begun while destruction waits is refused at once."""
    manager = env.manager
    await env.seed("reuse", {1: "old-1"})
    old = await manager.get_tenant("reuse")
    async with manager.session(old) as holder, manager.session(old) as late:
        await holder.execute(sa.text("SELECT 1"))
        deletion = asyncio.create_task(manager.delete_tenant(old, destroy_data=True))
        await asyncio.sleep(0.5)
        assert not deletion.done()
        begun = asyncio.create_task(_begin(late))  # a transaction begins now, touching no table
        # Answered while the holder still holds the marker, so not queued behind the
        # deletion's lock (nor behind a pooled connection). The bound stays under
        # DESTROY_WAIT, after which the holder is ended: room for a slow connect.
        started = time.monotonic()
        await asyncio.wait([begun], timeout=_incarnation.DESTROY_WAIT - 1.0)
        at_once = begun.done()
        waited = f"{time.monotonic() - started:.2f} s, pool: {manager.engine.pool.status()}"
        await holder.commit()
        await asyncio.wait_for(deletion, 30)
        await env.seed("reuse", {1: "new-1"})
        first = await begun
        if first is None:
            # Let through: it goes on reading and writing after the re-registration.
            later = await _read(late, env)
            assert isinstance(later, BaseException) or "new-1" not in later, "it read the new rows"
            if not isinstance(later, BaseException):
                late.add(env.model(id=9, description="old-late"))
                await late.commit()
        # Not queued behind the deletion (holding a pooled connection), nor let through
        # once it is done: refused at once, a 503.
        assert at_once and isinstance(first, TenancyUnavailableError), (first, waited)
        assert isinstance(await _read(late, env), REFUSED)  # and its next transaction too
    async with manager.session(await manager.get_tenant("reuse")) as session:
        assert await _descriptions(session, env) == ["new-1"]
    await _others_intact(env)


async def test_a_transaction_begun_while_destruction_waits_is_refused(case: Case) -> None:
    if case.old_storage != LOCKED:
        pytest.skip("destruction of a database or a file does not wait for transactions")
    await _begun_while_destruction_waits(case.env)


async def test_a_process_with_a_stale_cache_never_reaches_the_new_incarnation(case: Case) -> None:
    # A second manager stands for another worker process: its own pools, and a cache that
    # still holds the old incarnation (its invalidation channel is stopped, as if the
    # deletion's message were still on its way).
    env = case.env
    await env.seed("reuse", {1: "old-1", 2: "old-2"})
    other = TenancyManager(env.manager.config.model_copy(update={"cache_ttl": 3600.0}))
    await other.initialize()
    if other.invalidation is not None:
        await other.invalidation.close()
    transport = httpx.ASGITransport(app=build_app(other, env.model))
    headers = {"X-Tenant-ID": "reuse"}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://other") as client:
            response = await client.get("/orders", headers=headers)  # cached, its pools warm
            assert [o["description"] for o in response.json()["orders"]] == ["old-1", "old-2"]
            await env.manager.delete_tenant("reuse", destroy_data=True)
            await env.seed("reuse", {1: "new-1"})
            for _ in range(2):  # the pooled connection, then a new one
                read = await client.get("/orders", headers=headers)
                assert read.status_code in (404, 503), read.text
                assert "new-1" not in read.text
            write = await client.post(
                "/orders", params={"order_id": 5, "description": "old"}, headers=headers
            )
            assert write.status_code in (404, 503), write.text
            assert (await other.lookup.get("reuse")) is not None  # still the stale record
    finally:
        await other.close()
    response = await env.get("reuse", "/orders")
    assert [o["description"] for o in response.json()["orders"]] == ["new-1"]
    await _others_intact(env)


async def test_destruction_ends_transactions_that_outstay_the_wait(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.old_storage != LOCKED:
        pytest.skip("destruction of a database or a file does not wait for transactions")
    monkeypatch.setattr(_incarnation, "DESTROY_WAIT", 0.3)
    env = case.env
    await env.seed("reuse", {1: "old-1"})
    old = await env.manager.get_tenant("reuse")
    async with env.manager.session(old) as session:
        await session.execute(sa.text("SELECT 1"))  # begun, then idle in its transaction
        if env.manager.config.database_owner_url is not None:
            # Row-level security, hybrid tiers and tenant roles destroy as the owner role,
            # which may not end the application role's backends: refused, the data kept,
            # retryable.
            with pytest.raises(TenancyUnavailableError, match="pg_signal_backend"):
                await asyncio.wait_for(env.manager.delete_tenant(old, destroy_data=True), 10)
            assert (await env.manager.get_tenant("reuse")).status is TenantStatus.DELETED
            assert await _descriptions(session, env) == ["old-1"]
            await _server_sql(env, f'GRANT pg_signal_backend TO "{_owner(env)}"')
        await asyncio.wait_for(env.manager.delete_tenant(old, destroy_data=True), 10)
        with pytest.raises((TenancyUnavailableError, sa_exc.DBAPIError)):
            await _descriptions(session, env)  # its backend was ended
        await session.rollback()
    assert [t.identifier for t in await env.manager.list_tenants()] == ["alpha", "beta"]
    await _others_intact(env)


def _owner(env: Env) -> str:
    return str(make_url(env.manager.config.database_owner_url or "").username)


async def _server_sql(env: Env, statement: str) -> None:
    admin = await _postgres_admin(_admin_url(env))
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def test_a_session_below_the_manager_is_refused_too(case: Case) -> None:
    # The manager refuses the old record (it asks the registry); the storage refuses it too.
    env = case.env
    await env.seed("reuse", {1: "old-1"})
    old = await env.manager.get_tenant("reuse")
    await env.manager.delete_tenant(old, destroy_data=True)
    await env.seed("reuse", {1: "new-1"})
    with pytest.raises(TenantNotFoundError):
        async with env.manager.session(old):
            pass
    async with await env.manager.isolation.session(old) as session:
        with pytest.raises(REFUSED):
            await _descriptions(session, env)
    response = await env.get("reuse", "/orders")
    assert [o["description"] for o in response.json()["orders"]] == ["new-1"]


# -- behind PgBouncer ------------------------------------------------------------------


@pytest.fixture
async def bouncer_env(postgres_url: str) -> AsyncIterator[Env]:
    # Three server connections: the old request's, the deletion's, the re-registration's.
    async with (
        running_pgbouncer(postgres_url, pool_size=3) as url,
        two_tenants(url, database_pgbouncer=True, database_pool_size=4) as env,
    ):
        yield env


async def test_behind_pgbouncer_an_old_request_never_reaches_the_new_incarnation(bouncer_env: Env) -> None:
    await _old_request_meets_the_deletion(bouncer_env, LOCKED)


async def test_behind_pgbouncer_a_transaction_begun_while_destruction_waits_is_refused(
    bouncer_env: Env,
) -> None:
    await _begun_while_destruction_waits(bouncer_env)


# -- the application cache and the rate limiter in Redis -------------------------------


async def test_redis_cache_and_rate_limit_keys_belong_to_one_incarnation(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    settings: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_key_prefix": redis_prefix,
        "rate_limit_enabled": True,
        "rate_limit_requests": 2,
        "rate_limit_window": 60.0,
    }
    # The cache's prefix allows no ":"; its keys are removed below.
    cache_prefix = redis_prefix.replace(":", ".").rstrip(".")
    cache = TenantCache(RedisCacheBackend(redis_url), prefix=cache_prefix, ttl=60)
    try:
        async with two_tenants(postgres_url, **settings) as env:
            await env.seed("reuse", {1: "old-1"})
            old = await env.manager.get_tenant("reuse")
            await cache.set("dashboard", {"orders": ["old-1"]}, tenant=old)
            for _ in range(2):
                assert (await env.get("reuse", "/orders")).status_code == 200
            assert (await env.get("reuse", "/orders")).status_code == 429  # the old quota is used up

            await env.manager.delete_tenant(old, destroy_data=True)
            await env.seed("reuse", {1: "new-1"})
            new = await env.manager.get_tenant("reuse")
            # A request of the old incarnation still in flight writes its cache entry now.
            await cache.set("late", "old", tenant=old)

            assert await cache.get("dashboard", tenant=new) is None
            assert await cache.get("late", tenant=new) is None
            assert await cache.get("dashboard", tenant=old) == {"orders": ["old-1"]}  # apart, not gone
            response = await env.get("reuse", "/orders")  # a full quota
            assert response.status_code == 200, response.text
            assert response.headers["RateLimit-Remaining"] == "1"
            assert [o["description"] for o in response.json()["orders"]] == ["new-1"]
            # The old incarnation's invalidation leaves the new one's entries alone.
            await cache.set("dashboard", {"orders": ["new-1"]}, tenant=new)
            await cache.invalidate_tenant(old)
            assert await cache.get("dashboard", tenant=new) == {"orders": ["new-1"]}
    finally:
        assert isinstance(cache.backend, RedisCacheBackend)
        redis = cache.backend.redis
        keys = [key async for key in redis.scan_iter(match=f"{cache_prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await cache.close()


async def test_the_redis_tenant_cache_never_returns_the_old_incarnation(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    # The Redis cache in front of the SQL registry, shared by two workers: the second one
    # read (and so cached) the old record just before it was purged.
    def store() -> CachingTenantStore:
        return CachingTenantStore(SQLAlchemyTenantStore(postgres_url), redis_url, prefix=redis_prefix)

    config = TenancyConfig(database_url=postgres_url, database_pool_size=2)
    manager, other = TenancyManager(config, store()), TenancyManager(config, store())
    await manager.initialize()
    await other.initialize()
    try:
        old = await manager.register_tenant("reuse", "Old", app_metadata=Base.metadata)
        await manager.delete_tenant(old)  # soft first: the record stays, deleted
        deleted = await other.store.get_by_identifier("reuse")  # cached in Redis
        assert deleted is not None and deleted.id == old.id
        await manager.delete_tenant(old, destroy_data=True)  # then purged
        new = await manager.register_tenant("reuse", "New", app_metadata=Base.metadata)
        for worker in (manager, other):
            assert (await worker.store.get_by_identifier("reuse")) == new
            assert await worker.store.get_by_id(old.id) is None
        with pytest.raises(TenantNotFoundError):
            async with other.session(old):
                pass
    finally:
        await other.close()
        await manager.close()


# -- markers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant_id", "expected"),
    [
        ("6f1c2d1e-8a4b-4c8e-9d0f-1a2b3c4d5e6f", "fastapi_tenancy:6f1c2d1e-8a4b-4c8e-9d0f-1a2b3c4d5e6f"),
        ("t1", "fastapi_tenancy:t1"),
        ("x" * 48, "fastapi_tenancy:sha256:"),
        ("a :b%'`\"", "fastapi_tenancy:sha256:"),
    ],
    ids=["uuid", "short", "too-long", "needs-escaping"],
)
def test_a_marker_name_fits_every_backend(tenant_id: str, expected: str) -> None:
    name = marker_name(tenant_id)
    assert name.startswith(expected)
    assert len(name.encode()) <= 63
    assert marker_name(tenant_id) != marker_name(tenant_id + "y")


# -- storage made outside the library ---------------------------------------------------


async def _drop_marker(env: Env, tenant: Tenant) -> None:
    """Make `tenant`'s storage look made outside the library: no marker, no pooled connection."""
    isolation = env.manager.isolation.serving(tenant)
    name = marker_name(tenant.id)
    if isinstance(isolation, SchemaIsolation):
        async with isolation.ddl_engine.begin() as conn:
            schema = isolation.storage_name(tenant.identifier)
            await conn.exec_driver_sql(f'DROP VIEW "{schema}"."{name}"')
    elif isinstance(isolation, DatabaseIsolation):
        url = isolation.tenant_url(tenant)
        mysql = url.get_backend_name() != "postgresql"
        engine = create_async_engine(url, poolclass=sa.pool.NullPool)
        try:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(f"DROP VIEW `{name}`" if mysql else f'DROP VIEW public."{name}"')
        finally:
            await engine.dispose()
        await isolation.engines.discard(tenant.id)
    else:
        assert isinstance(isolation, SQLiteFileIsolation)
        with sqlite3.connect(isolation.path(tenant)) as db:
            db.execute(f'DROP VIEW "{name}"')
        await isolation.engines.discard(tenant.id)


async def test_storage_without_its_marker_is_refused_until_adopted(case: Case) -> None:
    env = case.env
    await env.seed("reuse", {1: "old-1"})
    tenant = await env.manager.get_tenant("reuse")
    if isinstance(env.manager.isolation.serving(tenant), RLSIsolation):
        await env.manager.adopt_storage("reuse")  # shared tables: nothing to mark, a no-op
        assert (await env.get("reuse", "/orders")).status_code == 200
        return
    await _drop_marker(env, tenant)
    response = await env.get("reuse", "/orders")
    assert response.status_code == 404, response.text
    await env.manager.adopt_storage("reuse")
    await env.manager.adopt_storage("reuse")  # idempotent
    response = await env.get("reuse", "/orders")
    assert [o["description"] for o in response.json()["orders"]] == ["old-1"]
    # Storage marked for another tenant is never taken over.
    stranger = Tenant(identifier="reuse", name="Stranger", tier=tenant.tier)
    with pytest.raises(ProvisioningError, match="another tenant"):
        await env.manager.isolation.adopt(stranger)
    await _others_intact(env)


async def test_doctor_reports_a_schema_without_its_marker(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        checks = {c.name: c for c in await run_checks(env.manager)}
        assert checks["tenant storage"].status == "ok", checks["tenant storage"].detail
        await _drop_marker(env, await env.manager.get_tenant("beta"))
        checks = {c.name: c for c in await run_checks(env.manager)}
        assert checks["tenant storage"].status == "fail"
        assert "not marked" in checks["tenant storage"].detail
        assert "beta" in checks["tenant storage"].detail and "alpha" not in checks["tenant storage"].detail
