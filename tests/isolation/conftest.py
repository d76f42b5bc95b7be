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


@asynccontextmanager
async def made_roles(server_url: str, *, reassign: bool = True) -> AsyncIterator[Roles]:
    """An owner role (CREATE on the database and `public`) and an application role (nothing),
    on the server and database of `server_url` (a superuser's), dropped afterwards.

    `reassign=False` drops the schemas they own instead of handing them to the superuser
    (on Citus 13.2, REASSIGN OWNED of distributed schemas ended the coordinator's process).
    """
    suffix = uuid.uuid4().hex[:10]
    owner, app = f"ft_owner_{suffix}", f"ft_app_{suffix}"
    database = make_url(server_url).database
    admin = await _postgres_admin(server_url)
    try:
        await admin.execute(f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER NOBYPASSRLS')
        await admin.execute(f'CREATE ROLE "{app}" LOGIN NOSUPERUSER NOBYPASSRLS')
        await admin.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{owner}"')
        await admin.execute(f'GRANT CREATE, USAGE ON SCHEMA public TO "{owner}"')
    finally:
        await admin.close()
    url = make_url(server_url)
    yield Roles(
        owner_url=url.set(username=owner).render_as_string(hide_password=False),
        app_url=url.set(username=app).render_as_string(hide_password=False),
        owner=owner,
        app=app,
        admin_url=server_url,
    )
    admin = await _postgres_admin(server_url)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1::text[])",
            [owner, app],
        )
        if reassign:
            await admin.execute(f'REASSIGN OWNED BY "{owner}", "{app}" TO CURRENT_USER')
        else:
            owned = await admin.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspowner::regrole::text = ANY($1::text[])",
                [f'"{owner}"', f'"{app}"', owner, app],
            )
            for row in owned:
                await admin.execute(f'DROP SCHEMA "{row["nspname"]}" CASCADE')
        # One role at a time: PostgreSQL fails ("could not find tuple for default ACL") to
        # drop, in one statement, the default privileges one of the roles gave the other.
        await admin.execute(f'DROP OWNED BY "{app}"')
        await admin.execute(f'DROP OWNED BY "{owner}"')
        await admin.execute(f'DROP ROLE "{owner}"')
        await admin.execute(f'DROP ROLE "{app}"')
    finally:
        await admin.close()


@pytest.fixture
async def roles(postgres_url: str) -> AsyncIterator[Roles]:
    """An owner role (CREATE on the database and `public`) and an application role (nothing)."""
    async with made_roles(postgres_url) as made:
        yield made


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
async def citus_tenant_roles(citus_url: str) -> AsyncIterator[Roles]:
    """`tenant_roles` on the Citus coordinator (roles made there reach every worker)."""
    async with made_roles(citus_url, reassign=False) as roles, made_tenant_roles(roles) as made:
        yield made
