"""Tenant roles (`schema_tenant_roles`) on a Citus cluster: roles and grants made on the
coordinator reach the workers, each tenant's statements reach its worker as its own role,
and that role cannot read the other tenant's schema through the coordinator. Two tenants
with overlapping primary keys, on the two workers, a pool of ONE connection."""

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_tenancy.doctor import run_checks
from fastapi_tenancy.isolation.citus import CitusCluster
from fastapi_tenancy.isolation.roles import role_name

from ..conftest import _postgres_admin
from ..isolation.conftest import Roles
from ..isolation.test_matrix import Env, two_tenants

ROLE_OF = "SELECT current_user"


@pytest.fixture
async def env(citus_tenant_roles: Roles) -> AsyncIterator[Env]:
    roles = citus_tenant_roles
    async with two_tenants(
        roles.app_url, database_owner_url=roles.owner_url, schema_tenant_roles=True
    ) as environment:
        yield environment


async def _sql(env: Env, tenant: str, *statements: str) -> list[Any]:
    response = await env.client.post("/sql", json=list(statements), headers={"X-Tenant-ID": tenant})
    assert response.status_code == 200, response.text
    results: list[Any] = response.json()["results"]
    return results


async def _on_workers(roles: Roles, query: str) -> list[Any]:
    """`query`'s one JSON value on each worker, as the superuser."""
    admin = await _postgres_admin(roles.admin_url)
    try:
        rows = await admin.fetch("SELECT success, result FROM run_command_on_workers($1)", query)
    finally:
        await admin.close()
    assert all(row["success"] for row in rows), rows
    return [json.loads(row["result"]) for row in rows]


async def test_roles_and_grants_reach_the_workers_and_keep_tenants_apart(
    env: Env, citus_tenant_roles: Roles
) -> None:
    roles = citus_tenant_roles
    database = str(make_url(roles.app_url).database)
    alpha, beta = (role_name(f"tenant_{slug}", database) for slug in ("alpha", "beta"))
    cluster = env.manager.isolation.cluster
    assert isinstance(cluster, CitusCluster)
    placed = await cluster.placements(["tenant_alpha", "tenant_beta"])
    assert len(set(placed.values())) == 2, placed  # one tenant on each worker

    # Made on the coordinator, on every worker: the roles (which Citus logs in as there),
    # and each schema used by its own role only.
    found = await _on_workers(
        roles,
        "SELECT json_agg(json_build_array(rolname, rolcanlogin) ORDER BY rolname) FROM pg_roles "  # noqa: S608
        f"WHERE rolname IN ('{alpha}', '{beta}')",
    )
    assert found == [[[alpha, True], [beta, True]]] * 2
    usage = await _on_workers(
        roles,
        "SELECT json_agg(json_build_array(n.nspname, r.rolname) ORDER BY n.nspname, r.rolname) "  # noqa: S608
        "FROM pg_namespace n CROSS JOIN pg_roles r WHERE n.nspname IN ('tenant_alpha', 'tenant_beta') "
        f"AND r.rolname IN ('{alpha}', '{beta}', '{roles.app}') "
        "AND has_schema_privilege(r.oid, n.oid, 'USAGE')",
    )
    assert usage == [[["tenant_alpha", alpha], ["tenant_beta", beta]]] * 2

    # Each tenant's statements run as its role, on its worker: its own rows only.
    assert await _sql(env, "alpha", ROLE_OF, "SELECT description FROM orders ORDER BY id") == [
        [[alpha]],
        [["alpha-1"], ["alpha-2"]],
    ]
    assert await _sql(env, "beta", "SELECT description FROM tenant_beta.orders ORDER BY id") == [
        [["beta-1"], ["beta-3"]]
    ]
    # The other tenant's schema, named through the coordinator: refused, reads or writes.
    for statement in (
        "SELECT id, description FROM tenant_beta.orders",
        "INSERT INTO tenant_beta.orders VALUES (9, 'from alpha')",
        "UPDATE tenant_beta.orders SET description = 'from alpha'",
        "DELETE FROM tenant_beta.orders",
        "SELECT a.description FROM orders a JOIN tenant_beta.orders b USING (id)",
    ):
        with pytest.raises(sa_exc.ProgrammingError, match="permission denied for schema tenant_beta"):
            await _sql(env, "alpha", statement)

    class Other(DeclarativeBase):
        pass

    class BetaOrder(Other):
        __tablename__ = "orders"
        __table_args__ = {"schema": "tenant_beta"}  # noqa: RUF012
        id: Mapped[int] = mapped_column(primary_key=True)
        description: Mapped[str]

    async with env.manager.session("alpha") as session:
        with pytest.raises(sa_exc.ProgrammingError, match="permission denied"):
            await session.execute(sa.select(BetaOrder))
    # The login role alone (a route's RESET ROLE, code outside tenant sessions) reads neither.
    for schema in ("tenant_alpha", "tenant_beta"):
        async with env.manager.engine.connect() as conn:
            with pytest.raises(sa_exc.ProgrammingError, match=f"permission denied for schema {schema}"):
                await conn.execute(sa.text(f"SELECT * FROM {schema}.orders"))  # noqa: S608

    # A table a migration adds later (as the owner, through the coordinator) is distributed
    # with its schema and granted to the tenant's role only.
    await env.shared_sql_as_owner("CREATE TABLE tenant_alpha.notes (id serial PRIMARY KEY, body text)")
    assert await _sql(
        env, "alpha", "INSERT INTO notes (body) VALUES ('n') RETURNING id", "SELECT body FROM notes"
    ) == [
        [[1]],
        [["n"]],
    ]
    with pytest.raises(sa_exc.ProgrammingError, match="permission denied for schema tenant_alpha"):
        await _sql(env, "beta", "SELECT body FROM tenant_alpha.notes")
    admin = await _postgres_admin(roles.admin_url)
    try:
        distributed = (
            "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = 'tenant_alpha.notes'::regclass"
        )
        assert await admin.fetchval(distributed) == 1
    finally:
        await admin.close()
    for tenant, rows in (("alpha", [["alpha-1"], ["alpha-2"]]), ("beta", [["beta-1"], ["beta-3"]])):
        assert await _sql(env, tenant, "SELECT description FROM orders ORDER BY id") == [rows]


async def test_doctor_finds_a_tenant_role_that_cannot_log_in_and_grants_repair_it(
    env: Env, citus_tenant_roles: Roles
) -> None:
    roles = citus_tenant_roles
    alpha = role_name("tenant_alpha", str(make_url(roles.app_url).database))
    admin = await _postgres_admin(roles.admin_url)
    try:
        await admin.execute(f'ALTER ROLE "{alpha}" NOLOGIN')  # on every node
    finally:
        await admin.close()
    # (Requests go on for now, over connections to the workers Citus opened before; a new
    # one as the role would be refused.)
    checks = {c.name: c for c in await run_checks(env.manager)}
    assert checks["tenant roles"].status == "fail", checks["tenant roles"]
    assert f"{alpha!r} lacks LOGIN" in checks["tenant roles"].detail, checks["tenant roles"].detail
    tenant_roles = env.manager.isolation.roles
    assert tenant_roles is not None
    assert await tenant_roles.repair() == ["tenant_alpha"]
    assert {c.name: c for c in await run_checks(env.manager)}["tenant roles"].status == "ok"
    assert await _sql(env, "alpha", "SELECT description FROM orders ORDER BY id") == [
        [["alpha-1"], ["alpha-2"]]
    ]
