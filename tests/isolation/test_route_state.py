"""Route code that misbehaves: session-level state it sets, and transaction control it
sends, must never reach another request, another tenant or code outside tenant sessions.

Every setup runs on a pool of ONE connection (per tenant for a database per tenant), so
the next request, of either tenant, gets the very connection the route left behind.
"""

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from fastapi_tenancy.errors import TenantScopeError

from ..conftest import _postgres_admin
from .test_matrix import Env, _environment, _setup

# "citus": distributed schemas behind a Citus coordinator (the route's SQL reaches a worker).
POSTGRES_SETUPS = ["postgres", "citus", "rls", "hybrid", "postgres-database", "hybrid-database"]


@pytest.fixture(params=POSTGRES_SETUPS)
def pg_setup(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return _setup(request, request.param)  # sync: it asks for the async URL fixtures by name


@pytest.fixture
async def pg_env(pg_setup: tuple[str, dict[str, Any]]) -> AsyncIterator[Env]:
    async with _environment(*pg_setup) as environment:
        yield environment


async def _sql(env: Env, tenant: str, *statements: str) -> list[Any]:
    response = await env.client.post("/sql", json=list(statements), headers={"X-Tenant-ID": tenant})
    assert response.status_code == 200, response.text
    results: list[Any] = response.json()["results"]
    return results


async def _orders(env: Env, tenant: str) -> list[str]:
    response = await env.get(tenant, "/orders")
    assert response.status_code == 200, response.text
    return [o["description"] for o in response.json()["orders"]]


async def _serves_both_tenants(env: Env) -> None:
    for _ in range(2):
        assert await _orders(env, "alpha") == ["alpha-1", "alpha-2"]
        assert await _orders(env, "beta") == ["beta-1", "beta-3"]
        assert await _sql(env, "beta", "SELECT description FROM orders ORDER BY id") == [
            [["beta-1"], ["beta-3"]]
        ]


def _beta_schema(env: Env) -> str:
    # The schema beta's rows live in: its own (schema tier) or the shared one.
    return env.manager.isolation.storage_name("beta")


async def _outside_tenants(env: Env, statement: str) -> Any:
    """What `statement` answers on the manager's own pool (a connection of tenant sessions)."""
    async with env.manager.engine.connect() as conn:
        return await conn.scalar(sa.text(statement))


async def test_session_settings_of_a_route_do_not_outlive_its_transaction(pg_env: Env) -> None:
    env = pg_env
    before = await _outside_tenants(env, "SELECT current_setting('search_path')")
    schema = _beta_schema(env)
    await _sql(
        env,
        "alpha",
        f'SET search_path TO "{schema}", public',
        f"SELECT set_config('search_path', '\"{schema}\"', false)",
        "SET statement_timeout = '5min'",
        "SELECT set_config('fastapi_tenancy.tenant_id', 'someone-else', false)",
        "SET SESSION work_mem = '64kB'",
    )
    await _serves_both_tenants(env)
    # The shared pool, used outside any tenant: back to how it was opened.
    assert await _outside_tenants(env, "SELECT current_setting('search_path')") == before
    assert await _outside_tenants(env, "SELECT current_setting('statement_timeout')") == "0"
    assert await _outside_tenants(env, "SELECT current_setting('fastapi_tenancy.tenant_id', true)") in (
        "",
        None,
    )


async def test_a_route_cannot_leave_a_role_or_search_path_breaking_the_next_request(pg_env: Env) -> None:
    # On a database per tenant a search_path of pg_catalog broke the tenant's own next
    # request; SET ROLE broke the next tenant's (a 500 either way).
    env = pg_env
    role = f"ft_route_{uuid.uuid4().hex[:10]}"
    user = await _outside_tenants(env, "SELECT current_user")
    # Tenants in a database of their own connect as the owner role (hybrid).
    users = {user}
    for tenant in ("alpha", "beta"):
        users.add((await _sql(env, tenant, "SELECT current_user"))[0][0][0])
    # The superuser of the server the setup runs on (on Citus, CREATE ROLE and GRANT reach
    # the workers too).
    server = make_url(env.manager.config.database_url).set(username="postgres", password=None)
    admin = await _postgres_admin(server.render_as_string(hide_password=False))
    try:
        await admin.execute(f'CREATE ROLE "{role}" NOLOGIN')
        for member in users:
            await admin.execute(f'GRANT "{role}" TO "{member}"')
        await _sql(env, "alpha", f'SET ROLE "{role}"')
        await _serves_both_tenants(env)
        await _sql(env, "beta", "SET search_path TO pg_catalog")
        await _serves_both_tenants(env)
        assert await _outside_tenants(env, "SELECT current_user") == user
    finally:
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()


async def test_a_temporary_table_of_one_tenant_is_not_found_by_the_next(pg_env: Env) -> None:
    # Unqualified names look in pg_temp first: a temporary `orders` left on the pooled
    # connection would be what the next tenant's ORM query reads.
    env = pg_env
    await _sql(env, "alpha", "CREATE TEMPORARY TABLE orders AS SELECT * FROM orders")
    await _serves_both_tenants(env)


async def test_a_cursor_held_over_commit_is_closed(pg_env: Env) -> None:
    env = pg_env
    await _sql(env, "alpha", "DECLARE leak CURSOR WITH HOLD FOR SELECT description FROM orders")
    with pytest.raises(sa_exc.DBAPIError, match='cursor "leak" does not exist'):
        await _sql(env, "beta", "FETCH ALL FROM leak")


async def test_advisory_locks_of_a_route_are_released(pg_env: Env) -> None:
    env = pg_env
    await _sql(env, "alpha", "SELECT pg_advisory_lock(4242)")
    # Another connection gets the lock: the route's connection gave it back.
    engine = create_async_engine(env.manager.config.database_url, poolclass=sa.pool.NullPool)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(sa.text("SELECT pg_try_advisory_lock(4242)")) is True
    finally:
        await engine.dispose()


# Transaction control a route might send; ROLLBACK TO [SAVEPOINT] stays allowed.
CONTROLS = [
    "COMMIT",
    "commit",
    "  -- a comment\n COMMIT",
    "/* hidden */ COMMIT",
    "COMMIT AND CHAIN",
    "END",
    "ROLLBACK",
    "ROLLBACK AND CHAIN",
    "ABORT",
    "PREPARE TRANSACTION 'x'",
]


async def test_transaction_control_in_route_sql_is_refused(pg_env: Env) -> None:
    # Without the refusal: the COMMIT ends the scoped transaction, SQLAlchemy sends no new
    # BEGIN, and the SELECT runs on whatever search_path the session left (here beta's).
    env = pg_env
    schema = _beta_schema(env)
    for control in CONTROLS:
        statements = [
            f"SELECT set_config('search_path', '\"{schema}\"', false)",
            control,
            "SELECT description FROM orders ORDER BY id",
        ]
        response = await env.client.post("/sql", json=statements, headers={"X-Tenant-ID": "alpha"})
        # TenantScopeError: a 500 (a bug in the route), raised before the statement ran.
        assert response.status_code == 500, (control, response.text)
        assert response.json() == {"detail": TenantScopeError.detail}
        await _serves_both_tenants(env)


async def test_savepoints_in_route_sql_stay_allowed(pg_env: Env) -> None:
    env = pg_env
    results = await _sql(
        env,
        "alpha",
        "SAVEPOINT s",
        "DELETE FROM orders",
        "ROLLBACK TO SAVEPOINT s",
        "RELEASE SAVEPOINT s",
        "SELECT description FROM orders ORDER BY id",
    )
    assert results[-1] == [["alpha-1"], ["alpha-2"]]


async def test_a_transaction_ended_below_sqlalchemy_runs_nothing_more(pg_env: Env) -> None:
    # The raw driver, past the statement check: the next statement is refused instead
    # of running unscoped.
    env = pg_env
    tenant = await env.manager.get_tenant("alpha")
    async with env.manager.session(tenant) as session:
        await session.execute(sa.text("SELECT 1"))
        connection = await session.connection()
        raw: Any = (await connection.get_raw_connection()).driver_connection
        await raw.execute("COMMIT")
        with pytest.raises(TenantScopeError):
            await session.execute(sa.text("SELECT description FROM orders"))
        await session.rollback()
        assert (await session.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one() == 2
    await _serves_both_tenants(env)


@pytest.fixture
def mysql_setup(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return _setup(request, "mysql-database")


@pytest.fixture
async def mysql_env(mysql_setup: tuple[str, dict[str, Any]]) -> AsyncIterator[Env]:
    async with _environment(*mysql_setup) as environment:
        yield environment


async def test_use_of_another_database_does_not_outlive_the_request(mysql_env: Env) -> None:
    # The tenant's pool of one: its next, innocent request read the other database's rows.
    env = mysql_env
    beta = env.manager.isolation.storage_name("beta")
    assert await _sql(env, "alpha", f"USE `{beta}`", "SELECT description FROM orders ORDER BY id")
    await _serves_both_tenants(env)
    assert await _sql(env, "alpha", "SELECT DATABASE()") == [[[env.manager.isolation.storage_name("alpha")]]]
