"""Row-level security beyond the matrix: the roles it refuses, `verify`, the binding's edges.

Every test runs requests as a plain application role (fixture `roles`); the superuser
only sets up and inspects.
"""

import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import create_async_engine

from fastapi_tenancy import ConfigurationError, ProvisioningError, TenancyConfig, TenancyManager, Tenant
from fastapi_tenancy.doctor import run_checks
from fastapi_tenancy.isolation.rls import RLSIsolation

from ..apps import SharedBase, SharedOrder
from ..conftest import _postgres_admin
from .conftest import Roles
from .test_matrix import Env, shared_settings, two_tenants


def _config(app_url: str, owner_url: str, **settings: object) -> TenancyConfig:
    return TenancyConfig(
        database_url=app_url,
        database_owner_url=owner_url,
        isolation_strategy="rls",
        database_pool_size=1,
        database_max_overflow=0,
        **settings,  # type: ignore[arg-type]
    )


@pytest.fixture
async def env(roles: Roles) -> AsyncIterator[Env]:
    async with two_tenants(roles.app_url, **shared_settings(roles, "rls")) as environment:
        yield environment


def _isolation(env: Env) -> RLSIsolation:
    isolation = env.manager.isolation
    assert isinstance(isolation, RLSIsolation)
    return isolation


async def _refused(app_url: str, owner_url: str) -> str:
    manager = TenancyManager(_config(app_url, owner_url))
    try:
        with pytest.raises(ConfigurationError) as raised:
            await manager.initialize()
    finally:
        await manager.close()
    return str(raised.value)


async def test_a_superuser_is_refused_at_startup(roles: Roles) -> None:
    message = await _refused(roles.admin_url, roles.owner_url)
    assert "superuser or a role with BYPASSRLS" in message
    assert "an application role for requests" in message  # says how to fix it


@pytest.mark.parametrize("how", ["attribute", "membership"])
async def test_a_bypassrls_role_is_refused_at_startup(roles: Roles, how: str) -> None:
    admin = await _postgres_admin(roles.admin_url)
    bypass = f"ft_bypass_{uuid.uuid4().hex[:10]}"
    try:
        await admin.execute(f'CREATE ROLE "{bypass}" NOSUPERUSER BYPASSRLS')
        if how == "attribute":
            await admin.execute(f'ALTER ROLE "{roles.app}" BYPASSRLS')
        else:  # a role that can SET ROLE to one with BYPASSRLS is as good as one
            await admin.execute(f'GRANT "{bypass}" TO "{roles.app}"')
        message = await _refused(roles.app_url, roles.owner_url)
        assert "BYPASSRLS" in message
        assert (bypass in message) == (how == "membership")
    finally:
        await admin.execute(f'REVOKE "{bypass}" FROM "{roles.app}"')
        await admin.execute(f'DROP ROLE "{bypass}"')
        await admin.close()


async def test_the_owner_role_is_refused_for_requests(roles: Roles) -> None:
    message = await _refused(roles.owner_url, roles.owner_url)
    assert "owner role" in message and "database_owner_url" in message


async def test_a_role_owning_a_tenant_table_is_refused(roles: Roles) -> None:
    admin = await _postgres_admin(roles.admin_url)
    try:
        await admin.execute("CREATE TABLE public.notes (tenant_id text, body text)")
        await admin.execute(f'ALTER TABLE public.notes OWNER TO "{roles.app}"')
    finally:
        await admin.close()
    assert "owns tenant tables (public.notes)" in await _refused(roles.app_url, roles.owner_url)


async def test_the_app_role_passes_and_verify_is_clean_after_apply(env: Env) -> None:
    assert await _isolation(env).verify(SharedBase.metadata) == []


async def test_verify_reports_every_gap(env: Env, roles: Roles) -> None:
    isolation = _isolation(env)
    metadata = sa.MetaData()
    sa.Table("missing", metadata, sa.Column("tenant_id", sa.Text, primary_key=True))
    admin = await _postgres_admin(roles.admin_url)
    try:
        await admin.execute("CREATE TABLE public.unguarded (tenant_id text, body text)")
        await admin.execute("ALTER TABLE public.orders NO FORCE ROW LEVEL SECURITY")
        await admin.execute("CREATE TABLE public.half (tenant_id text, body text)")
        await admin.execute("ALTER TABLE public.half ENABLE ROW LEVEL SECURITY")
        await admin.execute("ALTER TABLE public.half FORCE ROW LEVEL SECURITY")
        await admin.execute("CREATE POLICY reads ON public.half FOR SELECT USING (true)")
        await admin.execute("CREATE TABLE public.unrelated (id int)")  # no tenant column: not a tenant table
    finally:
        await admin.close()
    problems = await isolation.verify(metadata)
    assert sorted(problems) == sorted(
        [
            "public.missing: table missing (run apply)",
            "public.orders: row-level security is not forced (its owner bypasses it)",
            "public.unguarded: row-level security is not enabled",
            "public.unguarded: row-level security is not forced (its owner bypasses it)",
            *(
                f"public.unguarded: no policy for {command}"
                for command in ("SELECT", "INSERT", "UPDATE", "DELETE")
            ),
            *(f"public.half: no policy for {command}" for command in ("INSERT", "UPDATE", "DELETE")),
            "public.half: permissive policy 'reads' widens the tenant policy",
        ]
    )
    await isolation.apply(SharedBase.metadata)  # puts back what is missing on its own tables
    assert not [p for p in await isolation.verify(SharedBase.metadata) if p.startswith("public.orders")]


async def test_a_table_without_the_tenant_column_is_refused(env: Env) -> None:
    metadata = sa.MetaData()
    sa.Table("everyone", metadata, sa.Column("id", sa.Integer, primary_key=True))
    with pytest.raises(ConfigurationError, match="'everyone'.*no 'tenant_id' column"):
        await _isolation(env).apply(metadata)


async def test_no_bound_tenant_reads_zero_rows_and_writes_nothing(env: Env) -> None:
    # The application role itself, outside any tenant session.
    async with env.manager.engine.connect() as conn:
        await conn.execute(sa.text("SELECT set_config('search_path', 'public', true)"))
        assert (await conn.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one() == 0
        with pytest.raises(sa_exc.DBAPIError, match="violates"):
            await conn.execute(sa.text("INSERT INTO orders (id, description) VALUES (9, 'nobody')"))
    assert (await env.shared_sql_as_owner("SELECT count(*) FROM orders")) == [0]


async def test_the_binding_never_lingers_on_the_pooled_connection(env: Env) -> None:
    alpha = await env.manager.get_tenant("alpha")
    async with env.manager.session(alpha) as session:
        pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        assert (await session.execute(sa.select(sa.func.count()).select_from(SharedOrder))).scalar_one() == 2
        await session.commit()
        # a new transaction after commit() is bound again
        assert (await session.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one() == 2
    async with env.manager.engine.connect() as conn:  # the same physical connection (pool of one)
        assert (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one() == pid
        setting = await conn.scalar(sa.text("SELECT current_setting('fastapi_tenancy.tenant_id', true)"))
        assert setting in ("", None)
        assert (await conn.execute(sa.text("SELECT count(*) FROM public.orders"))).scalar_one() == 0


async def test_a_rolled_back_savepoint_does_not_unbind_the_transaction(env: Env) -> None:
    beta = await env.manager.get_tenant("beta")
    async with env.manager.session(beta) as session:
        savepoint = await session.begin_nested()  # the first statement runs inside it
        assert (await session.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one() == 2
        await savepoint.rollback()
        assert (
            await session.execute(sa.text("SELECT description FROM orders ORDER BY id"))
        ).scalars().all() == [
            "beta-1",
            "beta-3",
        ]


async def test_autocommit_is_refused(env: Env) -> None:
    alpha = await env.manager.get_tenant("alpha")
    async with env.manager.session(alpha) as session:
        conn = await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
            await conn.execute(sa.text("SELECT count(*) FROM orders"))


async def test_inserts_get_the_tenant_and_cannot_name_another(env: Env) -> None:
    alpha, beta = await env.manager.get_tenant("alpha"), await env.manager.get_tenant("beta")
    async with env.manager.session(alpha) as session:
        await session.execute(sa.insert(SharedOrder).values(id=10, description="core"))  # no tenant_id
        await session.execute(sa.text("INSERT INTO orders (id, description) VALUES (11, 'raw')"))
        await session.commit()
        with pytest.raises(sa_exc.DBAPIError, match="row-level security"):
            await session.execute(
                sa.insert(SharedOrder).values(tenant_id=beta.id, id=12, description="smuggled")
            )
        await session.rollback()
        with pytest.raises(sa_exc.DBAPIError, match="row-level security"):
            await session.execute(sa.update(SharedOrder).values(tenant_id=beta.id))
    assert (await env.get("alpha", "/orders")).json()["orders"][-2:] == [
        {"id": 10, "description": "core"},
        {"id": 11, "description": "raw"},
    ]
    assert [o["id"] for o in (await env.get("beta", "/orders")).json()["orders"]] == [1, 3]


async def test_rows_already_carrying_a_tenant_id_are_never_adopted(env: Env) -> None:
    isolation = _isolation(env)
    newcomer = Tenant(identifier="newcomer", name="Newcomer")
    async with isolation.owner_engine.begin() as conn:  # rows left behind under that id
        await isolation.bind_owner(conn, newcomer)
        await conn.execute(sa.text("INSERT INTO public.orders (id, description) VALUES (1, 'left')"))
    with pytest.raises(ProvisioningError, match="already exist"):
        await isolation.provision(newcomer, SharedBase.metadata)
    await isolation.destroy(newcomer)
    await isolation.provision(newcomer, SharedBase.metadata)


async def test_the_registry_is_out_of_reach_of_the_app_role(env: Env, roles: Roles) -> None:
    engine = create_async_engine(roles.app_url, poolclass=sa.pool.NullPool)
    try:
        async with engine.connect() as conn:
            with pytest.raises(sa_exc.DBAPIError, match="permission denied for table tenants"):
                await conn.execute(sa.text("SELECT * FROM public.tenants"))
    finally:
        await engine.dispose()


async def test_doctor_reports_a_table_that_lost_its_guard(env: Env, roles: Roles) -> None:
    checks = {c.name: c for c in await run_checks(env.manager)}
    assert (checks["row-level security"].status, checks["tenant storage"].status) == ("ok", "ok")
    admin = await _postgres_admin(roles.admin_url)
    try:
        await admin.execute("ALTER TABLE public.orders NO FORCE ROW LEVEL SECURITY")
    finally:
        await admin.close()
    checks = {c.name: c for c in await run_checks(env.manager)}
    assert checks["row-level security"].status == "fail"
    assert "public.orders: row-level security is not forced" in checks["row-level security"].detail
