"""The isolation matrix: two tenants with overlapping primary keys, on PostgreSQL schemas
(a pool of ONE connection, so every request reuses the same physical connection), on
the distributed schemas of a Citus coordinator with two workers, on
SQLite files, on a database per tenant on PostgreSQL and MariaDB (a pool of one per
tenant), on shared tables under row-level security (as a plain application role) and on
hybrid tiers (alpha in a schema, beta in the shared tables), the last two on one server
and on the Citus cluster (the shared tables distributed by the tenant column). Every
request must see its own tenant's rows and nothing else."""

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from fastapi_tenancy import (
    ProvisioningError,
    TenancyConfig,
    TenancyManager,
    TenantAlreadyExistsError,
)
from fastapi_tenancy.isolation import SQLiteFileIsolation
from fastapi_tenancy.resolution.base import Resolver, ResolverFunc

from ..apps import Base, Order, SharedBase, SharedOrder, build_app
from .conftest import Roles
from .databases import dropped_afterwards, server_sql

ROWS = {"alpha": {1: "alpha-1", 2: "alpha-2"}, "beta": {1: "beta-1", 3: "beta-3"}}


@dataclass
class Env:
    backend: str
    manager: TenancyManager
    client: httpx.AsyncClient
    strategy: str = "schema"
    tiers: Iterator[str | None] = itertools.repeat(None)

    @property
    def model(self) -> type[Order] | type[SharedOrder]:
        return SharedOrder if self.strategy in SHARED_TABLES else Order

    @property
    def metadata(self) -> sa.MetaData:
        return SharedBase.metadata if self.strategy in SHARED_TABLES else Base.metadata

    async def get(self, tenant: str, path: str, **params: str | int) -> httpx.Response:
        return await self.client.get(path, params=params, headers={"X-Tenant-ID": tenant})

    async def post(self, tenant: str, path: str, **params: str | int) -> httpx.Response:
        return await self.client.post(path, params=params, headers={"X-Tenant-ID": tenant})

    async def seed(self, identifier: str, rows: dict[int, str]) -> None:
        tenant = await self.manager.register_tenant(
            identifier, identifier.title(), app_metadata=self.metadata, tier=next(self.tiers)
        )
        async with self.manager.session(tenant) as session:
            session.add_all(self.model(id=i, description=d) for i, d in rows.items())
            await session.commit()

    async def shared_sql(self, statement: str) -> list[object]:
        """Run SQL outside any tenant: in `public` (PostgreSQL) or the registry file (SQLite).

        On an engine of its own, with the server's default search_path: the
        manager's connections start with an empty one.
        """
        return await self._sql(self.manager.config.database_url, statement)

    async def shared_sql_as_owner(self, statement: str) -> list[object]:
        """Run SQL as the owner role of row-level security (`database_owner_url`)."""
        assert self.manager.config.database_owner_url is not None
        return await self._sql(self.manager.config.database_owner_url, statement)

    @staticmethod
    async def _sql(url: str, statement: str) -> list[object]:
        engine = create_async_engine(url, poolclass=sa.pool.NullPool)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(sa.text(statement))
                return list(result.scalars()) if result.returns_rows else []
        finally:
            await engine.dispose()


def shared_settings(roles: Roles, strategy: str) -> dict[str, Any]:
    """Settings of the row-level security and hybrid strategies for the test roles."""
    return {"isolation_strategy": strategy, "database_owner_url": roles.owner_url}


# Strategies whose tenants get storage of their own (schema, file, database), then those
# sharing tables (row-level security, and hybrid with one tenant in each tier).
# "citus": schemas on a Citus coordinator with two workers (distributed schemas).
STORAGE_SETUPS = ["sqlite", "postgres", "citus", "sqlite-database", "postgres-database", "mysql-database"]
SHARED_TABLES = ("rls", "hybrid")
# Hybrid with alpha in a database of its own (created by the owner role) and beta in the
# shared tables.
HYBRID_DATABASE = "hybrid-database"
# Schemas, each tenant's transactions running as its own role (schema_tenant_roles).
TENANT_ROLES = "postgres-roles"
# The same on a Citus coordinator: the roles and their grants reach the workers.
CITUS_TENANT_ROLES = "citus-roles"
# Row-level security and hybrid on the Citus coordinator: the shared tables distributed by
# the tenant column over two workers (hybrid: alpha's schema distributed, beta in them).
CITUS_SHARED = ("citus-rls", "citus-hybrid")


def _setup(request: pytest.FixtureRequest, name: str) -> tuple[str, dict[str, Any]]:
    """(application URL, settings) of one strategy the matrix runs for."""
    if name in ("sqlite", "postgres", "citus"):
        return str(request.getfixturevalue(f"{name}_url")), {}
    if name.endswith("-database") and name != HYBRID_DATABASE:
        url = str(request.getfixturevalue(f"{name.removesuffix('-database')}_url"))
        return url, {"isolation_strategy": "database", "database_tenant_pool_size": 1}
    if name in (TENANT_ROLES, CITUS_TENANT_ROLES):
        roles_: Roles = request.getfixturevalue(
            "tenant_roles" if name == TENANT_ROLES else "citus_tenant_roles"
        )
        return roles_.app_url, {"database_owner_url": roles_.owner_url, "schema_tenant_roles": True}
    if name in CITUS_SHARED:
        on_citus: Roles = request.getfixturevalue("citus_roles")
        return on_citus.app_url, shared_settings(on_citus, name.removeprefix("citus-"))
    roles: Roles = request.getfixturevalue("roles")
    if name == HYBRID_DATABASE:
        settings = {**shared_settings(roles, "hybrid"), "database_tenant_pool_size": 1}
        return roles.app_url, {**settings, "tiers": ("database", "rls"), "admin_url": roles.admin_url}
    return roles.app_url, shared_settings(roles, name)


@pytest.fixture(
    params=[*STORAGE_SETUPS, *SHARED_TABLES, HYBRID_DATABASE, TENANT_ROLES, CITUS_TENANT_ROLES, *CITUS_SHARED]
)
def setup(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return _setup(request, request.param)


@asynccontextmanager
async def _environment(url: str, settings: dict[str, Any]) -> AsyncIterator[Env]:
    if "admin_url" in settings:  # hybrid with a database tier: tenant databases of the owner role
        settings = dict(settings)
        admin_url = settings.pop("admin_url")
        owner = make_url(settings["database_owner_url"]).username
        await server_sql(admin_url, f'ALTER ROLE "{owner}" CREATEDB')
        async with (
            dropped_afterwards(admin_url) as prefix,
            two_tenants(url, schema_prefix=prefix, **settings) as env,
        ):
            yield env
        return
    if settings.get("isolation_strategy") != "database":
        async with two_tenants(url, **settings) as environment:
            yield environment
        return
    # Tenant databases live beside the test's own: a prefix of their own keeps them apart
    # from other tests on the shared server, and every one of them is dropped at the end.
    async with (
        dropped_afterwards(url) as prefix,
        two_tenants(url, schema_prefix=prefix, **settings) as environment,
    ):
        yield environment


@asynccontextmanager
async def two_tenants(
    url: str,
    *,
    build: Callable[[TenancyManager], FastAPI] = build_app,
    raise_app_exceptions: bool = True,
    resolver: Resolver | ResolverFunc | None = None,
    tiers: tuple[str, ...] = ("schema", "rls"),
    **settings: Any,
) -> AsyncIterator[Env]:
    """A manager on a pool of one connection, the test app (`build`), and tenants alpha and beta.

    `raise_app_exceptions=False` turns a route's own error into the 500 a server would send.
    """
    config = TenancyConfig(
        database_url=url,
        **{"database_pool_size": 1, "database_max_overflow": 0, **settings},
    )
    manager = TenancyManager(config, resolver=resolver)
    await manager.initialize()
    strategy = config.isolation_strategy
    # Hybrid: tenants alternate between `tiers`; by default alpha in a schema, beta in the
    # shared tables.
    placements = itertools.cycle(tiers) if strategy == "hybrid" else itertools.repeat(None)
    model = SharedOrder if strategy in SHARED_TABLES else Order
    app = build_app(manager, model) if build is build_app else build(manager)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            environment = Env(config.backend, manager, client, strategy, placements)
            for identifier, rows in ROWS.items():
                await environment.seed(identifier, rows)
            yield environment
    finally:
        await manager.close()


@pytest.fixture
async def env(setup: tuple[str, dict[str, Any]]) -> AsyncIterator[Env]:
    async with _environment(*setup) as environment:
        yield environment


# Citus has its own 1000-requests case, with a pool that fits (see there): through ONE
# pooled connection each request also waits for the coordinator's hop to a worker, and
# 1000 of them outlast pool_timeout on a busy machine (503s, not crossings).
@pytest.fixture(params=[s for s in (*STORAGE_SETUPS, *SHARED_TABLES, HYBRID_DATABASE) if s != "citus"])
def one_server_setup(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return _setup(request, request.param)


@pytest.fixture
async def one_server_env(one_server_setup: tuple[str, dict[str, Any]]) -> AsyncIterator[Env]:
    async with _environment(*one_server_setup) as environment:
        yield environment


@pytest.fixture(params=STORAGE_SETUPS)
def storage_setup(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    # Sync: an async fixture cannot ask for the async URL fixtures by name.
    return _setup(request, request.param)


@pytest.fixture
async def schema_env(storage_setup: tuple[str, dict[str, Any]]) -> AsyncIterator[Env]:
    """The matrix for strategies giving each tenant storage of its own (schema, file, database)."""
    async with _environment(*storage_setup) as environment:
        yield environment


def _descriptions(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [o["description"] for o in response.json()["orders"]]


async def test_reads_alternating_tenants_see_only_their_rows(env: Env) -> None:
    for _ in range(50):
        assert _descriptions(await env.get("alpha", "/orders")) == ["alpha-1", "alpha-2"]
        assert _descriptions(await env.get("beta", "/orders")) == ["beta-1", "beta-3"]


async def test_an_id_of_the_other_tenant_looks_like_no_id_at_all(env: Env) -> None:
    assert (await env.get("alpha", "/orders/1")).json() == {"id": 1, "description": "alpha-1"}
    assert (await env.get("beta", "/orders/1")).json() == {"id": 1, "description": "beta-1"}
    foreign, nowhere = await env.get("alpha", "/orders/3"), await env.get("alpha", "/orders/999")
    assert foreign.status_code == nowhere.status_code == 404
    assert foreign.content == nowhere.content
    assert foreign.headers == nowhere.headers


async def test_writes_never_reach_the_other_tenant(env: Env) -> None:
    assert (
        await env.client.put("/orders/1", params={"description": "changed"}, headers={"X-Tenant-ID": "alpha"})
    ).json() == {"updated": 1}
    assert (
        await env.client.put("/orders/3", params={"description": "changed"}, headers={"X-Tenant-ID": "alpha"})
    ).json() == {"updated": 0}
    assert (await env.post("alpha", "/orders", order_id=3, description="alpha-3")).status_code == 200
    assert _descriptions(await env.get("alpha", "/orders")) == ["changed", "alpha-2", "alpha-3"]
    assert _descriptions(await env.get("beta", "/orders")) == ["beta-1", "beta-3"]


async def test_commit_then_read_in_one_request_stays_in_the_tenant(env: Env) -> None:
    response = await env.post("beta", "/orders/commit-then-read", order_id=2, description="beta-2")
    assert _descriptions(response) == ["beta-1", "beta-2", "beta-3"]
    assert _descriptions(await env.get("alpha", "/orders")) == ["alpha-1", "alpha-2"]


async def test_session_begin_works_inside_a_route(env: Env) -> None:
    response = await env.post("alpha", "/orders/begin", order_id=5, description="alpha-5")
    assert _descriptions(response) == ["alpha-1", "alpha-2", "alpha-5"]
    assert _descriptions(await env.get("beta", "/orders")) == ["beta-1", "beta-3"]


async def test_raw_sql_reaches_only_the_tenant_and_never_the_registry(env: Env) -> None:
    assert _descriptions(await env.get("alpha", "/raw")) == ["alpha-1", "alpha-2"]
    assert _descriptions(await env.get("beta", "/raw")) == ["beta-1", "beta-3"]
    with pytest.raises(sa_exc.DBAPIError, match="tenants"):
        await env.get("alpha", "/raw", table="tenants")


async def test_a_same_named_shared_table_is_neither_read_nor_used_by_provisioning(schema_env: Env) -> None:
    env = schema_env
    await env.shared_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, description VARCHAR(200))")
    await env.shared_sql("INSERT INTO orders VALUES (1, 'SHARED-SECRET')")
    await env.seed("gamma", {})
    for path in ("/orders", "/raw"):
        assert _descriptions(await env.get("gamma", path)) == []
        assert _descriptions(await env.get("alpha", path)) == ["alpha-1", "alpha-2"]
    assert await env.shared_sql("SELECT description FROM orders") == ["SHARED-SECRET"]


async def test_a_deleted_slug_never_revives_old_data(env: Env) -> None:
    await env.manager.delete_tenant("alpha")
    response = await env.get("alpha", "/orders")
    assert (response.status_code, response.text) == (
        403,
        '{"detail": "Tenant is not active (status: deleted)"}',
    )
    # Soft-deleted: the slug stays reserved, so nobody can register it and inherit the data.
    with pytest.raises(TenantAlreadyExistsError, match="destroy_data=True"):
        await env.manager.register_tenant("alpha", "New Alpha", app_metadata=Base.metadata)
    await env.manager.delete_tenant("alpha", destroy_data=True)
    await env.seed("alpha", {})
    assert _descriptions(await env.get("alpha", "/orders")) == []
    assert _descriptions(await env.get("beta", "/orders")) == ["beta-1", "beta-3"]


async def test_leftover_storage_is_never_adopted(schema_env: Env, tmp_path: Path) -> None:
    env = schema_env
    config = env.manager.config
    if config.isolation_strategy == "database" and env.backend != "sqlite":
        name = f"{config.schema_prefix}delta"
        quoted = f'"{name}"' if env.backend == "postgresql" else f"`{name}`"
        await server_sql(config.database_url, f"CREATE DATABASE {quoted}")
    elif env.backend == "postgresql":
        await env.shared_sql('CREATE SCHEMA "tenant_delta"')
        await env.shared_sql(
            "CREATE TABLE tenant_delta.orders (id INTEGER PRIMARY KEY, description VARCHAR(200))"
        )
        await env.shared_sql("INSERT INTO tenant_delta.orders VALUES (1, 'OLD-CUSTOMER')")
    else:
        isolation = env.manager.isolation
        assert isinstance(isolation, SQLiteFileIsolation)
        (isolation.directory / f"app.{config.schema_prefix}delta.db").write_bytes(b"")
    with pytest.raises(ProvisioningError, match="already exists"):
        await env.manager.register_tenant("delta", "Delta", app_metadata=Base.metadata)
    assert await env.manager.store.get_by_identifier("delta") is None
    assert (await env.get("delta", "/orders")).status_code == 404


async def test_slugs_differing_only_in_dash_vs_double_dash_stay_apart(env: Env) -> None:
    await env.seed("acme-corp", {1: "single"})
    await env.seed("acme--corp", {1: "double"})
    assert _descriptions(await env.get("acme-corp", "/orders")) == ["single"]
    assert _descriptions(await env.get("acme--corp", "/orders")) == ["double"]
    if env.strategy not in SHARED_TABLES:
        names = {env.manager.isolation.storage_name(s) for s in ("acme-corp", "acme--corp")}
        prefix = env.manager.config.schema_prefix
        assert names == {f"{prefix}acme_corp", f"{prefix}acme__corp"}


async def test_failed_provisioning_leaves_no_half_made_tenant(env: Env) -> None:
    broken = sa.MetaData()  # tenant columns too, so that row-level security gets to the DDL
    sa.Table("good", broken, sa.Column("id", sa.Integer, primary_key=True), sa.Column("tenant_id", sa.Text))
    sa.Table(
        "bad",
        broken,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Text),
        sa.CheckConstraint("id >>> ((", name="nonsense"),
    )
    with pytest.raises(ProvisioningError):
        await env.manager.register_tenant("omega", "Omega", app_metadata=broken)
    assert await env.manager.store.get_by_identifier("omega") is None
    assert (await env.get("omega", "/orders")).status_code == 404
    await env.seed("omega", {7: "omega-7"})  # the slug is free again, and clean
    assert _descriptions(await env.get("omega", "/orders")) == ["omega-7"]


async def _concurrent_requests(env: Env, count: int = 1000) -> tuple[list[tuple[str, str]], int]:
    """`count` concurrent GET /orders over 20 tenants: (any crossing or other failure, 503s)."""
    tenants = [f"t{i:02d}" for i in range(20)]
    for name in tenants:
        await env.seed(name, {1: f"{name}-1", 2: f"{name}-2"})
    rng = random.Random(7)
    picks = [rng.choice(tenants) for _ in range(count)]
    responses = await asyncio.gather(*(env.get(name, "/orders") for name in picks))
    unavailable = sum(r.status_code == 503 for r in responses)
    crossed = [
        (name, r.text)
        for name, r in zip(picks, responses, strict=True)
        if r.status_code != 503 and (r.status_code != 200 or _descriptions(r) != [f"{name}-1", f"{name}-2"])
    ]
    return crossed, unavailable


async def test_1000_concurrent_requests_across_20_tenants_never_cross(one_server_env: Env) -> None:
    assert await _concurrent_requests(one_server_env) == ([], 0)


async def test_1000_concurrent_requests_on_citus_never_cross(citus_url: str) -> None:
    # Five pooled connections, not one: each request holds its connection for the
    # coordinator's round trip to a worker as well, so through one connection the 1000
    # requests run one after another (6.4 s on a quiet 2-core machine with the three nodes
    # on it, against 2.5 s with five), and on a busy machine the last ones outwait
    # pool_timeout (503s). With five, each physical connection still serves ~200 requests
    # of the 20 tenants (on both workers), one after another.
    async with two_tenants(citus_url, database_pool_size=5) as env:
        crossed, unavailable = await _concurrent_requests(env)
    assert crossed == []
    assert unavailable == 0


async def test_sqlite_tenants_cannot_attach_other_files(sqlite_url: str) -> None:
    async with two_tenants(sqlite_url) as env:
        isolation = env.manager.isolation
        assert isinstance(isolation, SQLiteFileIsolation)
        beta = await env.manager.get_tenant("beta")
        registry = isolation.directory / "app.db"
        for target in (registry, isolation.path(beta)):
            async with env.manager.session(await env.manager.get_tenant("alpha")) as session:
                with pytest.raises(sa_exc.DatabaseError, match="not authorized"):
                    await session.execute(sa.text(f"ATTACH DATABASE '{target}' AS other"))
