"""Tenant roles (`schema_tenant_roles`): each tenant transaction runs as its schema's own
role, so SQL naming another tenant's schema is refused by PostgreSQL's privileges, not
only missed by `search_path`. Two tenants with overlapping primary keys, a pool of ONE
connection; directly and through PgBouncer in transaction mode."""

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_tenancy import ConfigurationError, TenancyConfig, TenancyManager
from fastapi_tenancy.doctor import run_checks
from fastapi_tenancy.errors import TenantScopeError
from fastapi_tenancy.isolation.roles import group_name, role_name

from ..conftest import _postgres_admin, running_pgbouncer
from .conftest import Roles
from .test_matrix import Env, two_tenants


def _settings(roles: Roles, **extra: Any) -> dict[str, Any]:
    return {"database_owner_url": roles.owner_url, "schema_tenant_roles": True, **extra}


@pytest.fixture
async def env(tenant_roles: Roles) -> AsyncIterator[Env]:
    async with two_tenants(tenant_roles.app_url, **_settings(tenant_roles)) as environment:
        yield environment


def _role(env: Env, slug: str) -> str:
    database = make_url(env.manager.config.database_url).database
    assert database is not None
    return role_name(env.manager.isolation.storage_name(slug), database)


async def _sql(env: Env, tenant: str, *statements: str) -> list[Any]:
    response = await env.client.post("/sql", json=list(statements), headers={"X-Tenant-ID": tenant})
    assert response.status_code == 200, response.text
    results: list[Any] = response.json()["results"]
    return results


async def _refused(env: Env, tenant: str, *statements: str) -> None:
    """The route's statements are refused before the first runs (`TenantScopeError`)."""
    response = await env.client.post("/sql", json=list(statements), headers={"X-Tenant-ID": tenant})
    assert response.status_code == TenantScopeError.status_code, response.text
    assert response.json() == {"detail": TenantScopeError.detail}


async def _orders(env: Env, tenant: str) -> list[str]:
    response = await env.get(tenant, "/orders")
    assert response.status_code == 200, response.text
    return [o["description"] for o in response.json()["orders"]]


async def _admin(roles: Roles, *statements: str) -> list[tuple[Any, ...]]:
    admin = await _postgres_admin(roles.admin_url)
    try:
        rows: list[tuple[Any, ...]] = []
        for statement in statements:
            rows = [tuple(r) for r in await admin.fetch(statement)]
        return rows
    finally:
        await admin.close()


async def _both_intact(env: Env) -> None:
    assert await _orders(env, "alpha") == ["alpha-1", "alpha-2"]
    assert await _orders(env, "beta") == ["beta-1", "beta-3"]


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT id, description FROM tenant_beta.orders",
        'SELECT description FROM "tenant_beta".orders WHERE id = 1',
        "INSERT INTO tenant_beta.orders VALUES (9, 'from alpha')",
        "UPDATE tenant_beta.orders SET description = 'from alpha'",
        "DELETE FROM tenant_beta.orders",
        'SELECT count(*) FROM tenant_beta."fastapi_tenancy:x"',
    ],
    ids=["read", "read-quoted", "insert", "update", "delete", "marker"],
)
async def test_sql_naming_the_other_tenants_schema_is_refused(env: Env, statement: str) -> None:
    with pytest.raises(sa_exc.ProgrammingError, match="permission denied for schema tenant_beta"):
        await _sql(env, "alpha", statement)
    await _both_intact(env)


@pytest.mark.parametrize(
    "statement",
    ["SET search_path TO tenant_beta", "SELECT set_config('search_path', 'tenant_beta', true)"],
    ids=["set", "set_config"],
)
async def test_a_route_pointing_search_path_at_the_other_tenant_reads_nothing(
    env: Env, statement: str
) -> None:
    # Schemas the role may not use are left out of name lookup: nothing named resolves.
    with pytest.raises(sa_exc.ProgrammingError, match='relation "orders" does not exist'):
        await _sql(env, "alpha", statement, "SELECT description FROM orders")
    await _both_intact(env)


async def test_an_orm_model_with_an_explicit_schema_is_refused(env: Env) -> None:
    class Other(DeclarativeBase):
        pass

    class BetaOrder(Other):
        __tablename__ = "orders"
        __table_args__ = {"schema": "tenant_beta"}  # noqa: RUF012
        id: Mapped[int] = mapped_column(primary_key=True)
        description: Mapped[str]

    alpha = await env.manager.get_tenant("alpha")
    async with env.manager.session(alpha) as session:
        with pytest.raises(sa_exc.ProgrammingError, match="permission denied"):
            await session.execute(sa.select(BetaOrder))
    async with env.manager.session(alpha) as session:
        session.add(BetaOrder(id=5, description="from alpha"))
        with pytest.raises(sa_exc.ProgrammingError, match="permission denied"):
            await session.commit()
    await _both_intact(env)


async def test_own_rows_and_granted_shared_tables_still_work(env: Env, tenant_roles: Roles) -> None:
    # Own schema: reads and writes, by name or qualified.
    assert await _sql(env, "alpha", "SELECT description FROM tenant_alpha.orders ORDER BY id") == [
        [["alpha-1"], ["alpha-2"]]
    ]
    assert (await env.post("alpha", "/orders", order_id=3, description="alpha-3")).status_code == 200
    # A shared table in public: reachable once granted to the group role of the tenant roles.
    await env.shared_sql_as_owner("CREATE TABLE public.plans (name text)")
    await env.shared_sql_as_owner("INSERT INTO public.plans VALUES ('pro')")
    with pytest.raises(sa_exc.ProgrammingError, match="permission denied for table plans"):
        await _sql(env, "beta", "SELECT name FROM public.plans")
    roles = env.manager.isolation.roles
    assert roles is not None and roles.group == group_name(str(make_url(tenant_roles.app_url).database))
    await env.shared_sql_as_owner(f'GRANT SELECT ON public.plans TO "{roles.group}"')
    assert await _sql(env, "beta", "SELECT name FROM public.plans") == [[["pro"]]]
    assert await _orders(env, "alpha") == ["alpha-1", "alpha-2", "alpha-3"]


async def test_tables_the_owner_adds_later_are_granted(env: Env) -> None:
    # What a migration (run as the owner) adds: default privileges cover it.
    await env.shared_sql_as_owner("CREATE TABLE tenant_alpha.notes (id serial PRIMARY KEY, body text)")
    assert await _sql(
        env, "alpha", "INSERT INTO notes (body) VALUES ('n') RETURNING id", "SELECT body FROM notes"
    ) == [
        [[1]],
        [["n"]],
    ]
    with pytest.raises(sa_exc.ProgrammingError, match="permission denied for schema tenant_alpha"):
        await _sql(env, "beta", "SELECT body FROM tenant_alpha.notes")


@pytest.mark.parametrize(
    "statement",
    [
        "RESET ROLE",
        "SET ROLE NONE",
        "SET ROLE {beta}",
        "set local role {beta}",
        "SET SESSION AUTHORIZATION DEFAULT",
        "RESET ALL",
        "DISCARD ALL",
        "SELECT set_config('role', '{beta_text}', true)",
        "SELECT set_config('ROLE', '{beta_text}', false)",
        "SELECT set_config(lower('ROLE'), '{beta_text}', true)",
    ],
)
async def test_a_route_cannot_switch_to_another_role(env: Env, statement: str) -> None:
    beta = _role(env, "beta")
    sql = statement.format(beta=f'"{beta}"', beta_text=beta)
    await _refused(env, "alpha", sql, "SELECT description FROM tenant_beta.orders")
    await _both_intact(env)


async def test_the_login_role_reads_no_tenant_schema(env: Env) -> None:
    # What RESET ROLE in a route would land on, and what code outside tenant sessions runs as.
    for schema in ("tenant_alpha", "tenant_beta"):
        async with env.manager.engine.connect() as conn:
            with pytest.raises(sa_exc.ProgrammingError, match=f"permission denied for schema {schema}"):
                await conn.execute(sa.text(f"SELECT * FROM {schema}.orders"))  # noqa: S608
    # Nor the registry, which the owner role keeps.
    async with env.manager.engine.connect() as conn:
        with pytest.raises(sa_exc.ProgrammingError, match="permission denied for table tenants"):
            await conn.execute(sa.text("SELECT * FROM public.tenants"))


async def test_a_role_set_out_of_sight_does_not_outlive_the_request(env: Env, tenant_roles: Roles) -> None:
    # A function the library cannot see into sets the role for the session; the
    # reset sent with COMMIT takes it off the (only) pooled connection.
    await _admin(
        tenant_roles,
        "CREATE FUNCTION public.become(r text) RETURNS text LANGUAGE sql AS "
        "$$ SELECT set_config('role', r, false) $$",
    )
    alpha = _role(env, "alpha")
    assert await _sql(env, "alpha", f"SELECT public.become('{alpha}')", "SELECT current_user") == [
        [[alpha]],
        [[alpha]],
    ]
    async with env.manager.engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT current_user, session_user"))).one() == (
            tenant_roles.app,
            tenant_roles.app,
        )
    assert await _sql(env, "beta", "SELECT current_user") == [[[_role(env, "beta")]]]
    await _both_intact(env)


async def test_destroying_a_tenant_drops_its_role_and_registering_again_makes_it(
    env: Env, tenant_roles: Roles
) -> None:
    beta = _role(env, "beta")
    query = f"SELECT rolname FROM pg_roles WHERE rolname = '{beta}'"  # noqa: S608
    assert await _admin(tenant_roles, query) == [(beta,)]
    await env.manager.delete_tenant("beta", destroy_data=True)
    assert await _admin(tenant_roles, query) == []
    await env.seed("beta", {1: "new-beta-1"})
    assert await _admin(tenant_roles, query) == [(beta,)]
    assert await _orders(env, "beta") == ["new-beta-1"]
    assert await _orders(env, "alpha") == ["alpha-1", "alpha-2"]


async def test_doctor_finds_a_revoked_grant_and_grants_repair_it(env: Env, tenant_roles: Roles) -> None:
    checks = {c.name: c for c in await run_checks(env.manager)}
    assert checks["tenant roles"].status == "ok", checks["tenant roles"].detail
    alpha = _role(env, "alpha")
    await _admin(tenant_roles, f'REVOKE UPDATE ON tenant_alpha.orders FROM "{alpha}"')
    checks = {c.name: c for c in await run_checks(env.manager)}
    assert checks["tenant roles"].status == "fail"
    assert f"tenant_alpha: role '{alpha}' lacks 1 tables or sequences" in checks["tenant roles"].detail
    roles = env.manager.isolation.roles
    assert roles is not None
    assert await roles.repair() == ["tenant_alpha"]
    checks = {c.name: c for c in await run_checks(env.manager)}
    assert checks["tenant roles"].status == "ok", checks["tenant roles"].detail
    # A login role that reads a tenant schema by itself is reported (repair cannot take that away).
    await _admin(tenant_roles, f'GRANT USAGE ON SCHEMA tenant_beta TO "{tenant_roles.app}"')
    checks = {c.name: c for c in await run_checks(env.manager)}
    assert f"the login role '{tenant_roles.app}' uses it" in checks["tenant roles"].detail


async def test_a_missing_role_or_membership_is_a_503(env: Env, tenant_roles: Roles) -> None:
    alpha, beta = _role(env, "alpha"), _role(env, "beta")
    await _admin(tenant_roles, f'REVOKE "{alpha}" FROM "{tenant_roles.app}"')
    response = await env.get("alpha", "/orders")
    assert response.status_code == 503, response.text
    await _admin(tenant_roles, f'DROP OWNED BY "{beta}"', f'DROP ROLE "{beta}"')
    response = await env.get("beta", "/orders")
    assert response.status_code == 503, response.text
    roles = env.manager.isolation.roles
    assert roles is not None
    assert await roles.repair() == ["tenant_alpha", "tenant_beta"]
    await _both_intact(env)


async def test_the_role_travels_in_the_begin_message(env: Env) -> None:
    # No round trip of its own: the statements a request sends are those without roles.
    sent: list[str] = []
    engine = env.manager.engine.sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        assert await _orders(env, "alpha") == ["alpha-1", "alpha-2"]
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert len(sent) == 1 and "SET" not in sent[0].upper(), sent


async def test_login_roles_that_would_read_every_schema_are_refused(roles: Roles) -> None:
    # An INHERIT login role (before PostgreSQL 16) would use every tenant role's grants;
    # a superuser passes every privilege check.
    version = (await _admin(roles, "SHOW server_version_num"))[0][0]
    cases = [(roles.admin_url, "superuser")]
    if int(version) < 160000:
        cases.append((roles.app_url, "NOINHERIT"))
    for url, reason in cases:
        manager = TenancyManager(TenancyConfig(database_url=url, **_settings(roles)))
        try:
            with pytest.raises(ConfigurationError, match=reason):
                await manager.initialize()
        finally:
            await manager.close()


async def test_tenant_roles_need_an_owner_of_their_own(roles: Roles) -> None:
    from fastapi_tenancy.isolation import SchemaIsolation

    engine = create_async_engine(roles.app_url)
    try:
        with pytest.raises(ConfigurationError, match="database_owner_url"):
            SchemaIsolation(engine, tenant_roles=True)
    finally:
        await engine.dispose()


async def test_hybrid_schema_tier_tenants_run_as_their_roles(tenant_roles: Roles) -> None:
    settings = _settings(tenant_roles, isolation_strategy="hybrid")
    async with two_tenants(tenant_roles.app_url, **settings, tiers=("schema", "schema")) as env:
        await _both_intact(env)
        with pytest.raises(sa_exc.ProgrammingError, match="permission denied for schema tenant_alpha"):
            await _sql(env, "beta", "SELECT description FROM tenant_alpha.orders")
        assert await _sql(env, "beta", "SELECT current_user") == [[[_role(env, "beta")]]]
        query = f"SELECT 1 FROM pg_roles WHERE rolname = '{_role(env, 'beta')}'"  # noqa: S608
        await env.manager.delete_tenant("beta", destroy_data=True)
        assert await _admin(tenant_roles, query) == []


async def test_a_template_and_spares_are_granted_on_registration(tenant_roles: Roles) -> None:
    settings = _settings(tenant_roles, schema_template="tenancy_template", schema_spares=1)
    from ..apps import Base

    builder = TenancyManager(TenancyConfig(database_url=tenant_roles.app_url, **settings))
    try:
        await builder.isolation.build_template(Base.metadata)  # type: ignore[attr-defined]
    finally:
        await builder.close()
    async with two_tenants(tenant_roles.app_url, **settings) as env:
        await _both_intact(env)
        with pytest.raises(sa_exc.ProgrammingError, match="permission denied for schema tenant_alpha"):
            await _sql(env, "beta", "SELECT description FROM tenant_alpha.orders")
        checks = {c.name: c for c in await run_checks(env.manager)}
        assert checks["tenant roles"].status == "ok", checks["tenant roles"].detail


async def test_behind_pgbouncer_in_transaction_mode(tenant_roles: Roles) -> None:
    async with running_pgbouncer(tenant_roles.admin_url, (tenant_roles.app, tenant_roles.owner)) as bouncer:
        app_url = make_url(bouncer).set(username=tenant_roles.app).render_as_string(hide_password=False)
        async with two_tenants(app_url, **_settings(tenant_roles, database_pgbouncer=True)) as env:
            for _ in range(3):
                await _both_intact(env)
                with pytest.raises(sa_exc.ProgrammingError, match="permission denied for schema tenant_beta"):
                    await _sql(env, "alpha", "SELECT description FROM tenant_beta.orders")
                await _refused(env, "alpha", "RESET ROLE")
            async with env.manager.engine.connect() as conn:
                assert await conn.scalar(sa.text("SELECT current_user")) == tenant_roles.app


async def test_tenants_grants_repairs_from_the_shell(env: Env, tenant_roles: Roles) -> None:
    from ..cli.test_cli import _call

    shell = {"TENANCY_DATABASE_OWNER_URL": tenant_roles.owner_url, "TENANCY_SCHEMA_TENANT_ROLES": "true"}
    await _admin(tenant_roles, f'REVOKE USAGE ON SCHEMA tenant_beta FROM "{_role(env, "beta")}"')
    done = _call(tenant_roles.app_url, "--json", "tenants", "grants", env=shell)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["repaired"] == ["tenant_beta"]
    await _both_intact(env)
    # What it does not take away: the login role granted a tenant schema by hand.
    await _admin(tenant_roles, f'GRANT USAGE ON SCHEMA tenant_beta TO "{tenant_roles.app}"')
    done = _call(tenant_roles.app_url, "--json", "tenants", "grants", env=shell)
    assert done.returncode == 1, done.stderr
    assert "uses it without a tenant role" in json.loads(done.stdout)["detail"]
    # Not configured: a usage error.
    assert _call(tenant_roles.admin_url, "tenants", "grants").returncode == 2


async def test_hybrid_moves_keep_the_role_with_the_schema(tenant_roles: Roles) -> None:
    from ..apps import SharedBase

    async with two_tenants(
        tenant_roles.app_url, **_settings(tenant_roles, isolation_strategy="hybrid")
    ) as env:
        alpha = _role(env, "alpha")  # alpha in a schema, beta in the shared tables
        query = f"SELECT 1 FROM pg_roles WHERE rolname = '{alpha}'"  # noqa: S608
        await env.manager.move_tenant("alpha", "rls", app_metadata=SharedBase.metadata)
        await _both_intact(env)
        assert await _admin(tenant_roles, query) == [(1,)]  # the old copy is still its role's
        await env.manager.remove_old_copy("alpha")
        assert await _admin(tenant_roles, query) == []
        await env.manager.move_tenant("alpha", "schema", app_metadata=SharedBase.metadata)
        assert await _admin(tenant_roles, query) == [(1,)]
        await _both_intact(env)
        assert await _sql(env, "alpha", "SELECT current_user") == [[[alpha]]]
        with pytest.raises(sa_exc.ProgrammingError, match="permission denied for schema tenant_alpha"):
            async with env.manager.engine.connect() as conn:
                await conn.execute(sa.text("SELECT * FROM tenant_alpha.orders"))
