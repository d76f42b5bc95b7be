"""Roles for row-level security tests: an owner role for DDL and a plain application role.

Both are created per test with unique names (the cluster is shared, roles are cluster-wide)
and dropped after it, with everything they own in the test database.
"""

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from sqlalchemy.engine import make_url

from ..conftest import _postgres_admin


@dataclass(frozen=True)
class Roles:
    """URLs of one test database as its owner role and as its application role."""

    owner_url: str
    app_url: str
    owner: str
    app: str
    admin_url: str  # the superuser (postgres), for setup and for the refusal tests


async def _make_roles(url: str) -> Roles:
    suffix = uuid.uuid4().hex[:10]
    owner, app = f"ft_owner_{suffix}", f"ft_app_{suffix}"
    database = make_url(url).database
    admin = await _postgres_admin(url)
    try:
        await admin.execute(f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER NOBYPASSRLS')
        await admin.execute(f'CREATE ROLE "{app}" LOGIN NOSUPERUSER NOBYPASSRLS')
        await admin.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{owner}"')
        await admin.execute(f'GRANT CREATE, USAGE ON SCHEMA public TO "{owner}"')
    finally:
        await admin.close()
    parsed = make_url(url)
    return Roles(
        owner_url=parsed.set(username=owner).render_as_string(hide_password=False),
        app_url=parsed.set(username=app).render_as_string(hide_password=False),
        owner=owner,
        app=app,
        admin_url=url,
    )


@pytest.fixture
async def roles(postgres_url: str) -> AsyncIterator[Roles]:
    """An owner role (CREATE on the database and `public`) and an application role (nothing)."""
    made = await _make_roles(postgres_url)
    owner, app = made.owner, made.app
    yield made
    admin = await _postgres_admin(postgres_url)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1::text[])",
            [owner, app],
        )
        await admin.execute(f'REASSIGN OWNED BY "{owner}", "{app}" TO CURRENT_USER')
        # One role at a time: PostgreSQL fails ("could not find tuple for default ACL") to
        # drop, in one statement, the default privileges one of the roles gave the other.
        await admin.execute(f'DROP OWNED BY "{app}"')
        await admin.execute(f'DROP OWNED BY "{owner}"')
        await admin.execute(f'DROP ROLE "{owner}"')
        await admin.execute(f'DROP ROLE "{app}"')
    finally:
        await admin.close()


@pytest.fixture
async def citus_roles(citus_url: str) -> Roles:
    """`roles` in a database of the Citus cluster, on every node.

    Citus repeats CREATE ROLE and GRANT ... ON DATABASE of the coordinator on the workers;
    the grant on `public` is run on each worker too, where the owner role creates shards.
    Nothing is dropped afterwards: the cluster, and its roles, last one test session.
    """
    made = await _make_roles(citus_url)
    admin = await _postgres_admin(citus_url)
    try:
        await admin.execute(
            "SELECT run_command_on_workers($1)", f'GRANT CREATE, USAGE ON SCHEMA public TO "{made.owner}"'
        )
    finally:
        await admin.close()
    return made


@asynccontextmanager
async def made_tenant_roles(roles: Roles) -> AsyncIterator[Roles]:
    """`roles` for `schema_tenant_roles`: the owner may create roles, the app role is NOINHERIT.

    The tenant roles the test made (`<schema>@<database>`, and the group
    `tenants:<database>`: cluster-wide) are dropped after it.
    """
    database = make_url(roles.admin_url).database
    admin = await _postgres_admin(roles.admin_url)
    try:
        await admin.execute(f'ALTER ROLE "{roles.owner}" CREATEROLE')
        await admin.execute(f'ALTER ROLE "{roles.app}" NOINHERIT')
    finally:
        await admin.close()
    yield roles
    admin = await _postgres_admin(roles.admin_url)
    try:
        made = await admin.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE '%@' || $1 OR rolname = 'tenants:' || $1",
            database,
        )
        for row in made:
            await admin.execute(f'DROP OWNED BY "{row["rolname"]}"')
            await admin.execute(f'DROP ROLE "{row["rolname"]}"')
    finally:
        await admin.close()


@pytest.fixture
async def tenant_roles(roles: Roles) -> AsyncIterator[Roles]:
    """`roles` for `schema_tenant_roles` (`made_tenant_roles`)."""
    async with made_tenant_roles(roles) as made:
        yield made


@pytest.fixture
async def citus_tenant_roles(citus_roles: Roles) -> AsyncIterator[Roles]:
    """`tenant_roles` on the Citus cluster (roles made on the coordinator reach every worker)."""
    async with made_tenant_roles(citus_roles) as made:
        yield made
