"""Helpers for database-per-tenant tests: unique database name prefixes on the shared servers,
and dropping every database a test made under its prefix."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.engine import make_url

from ..conftest import _mysql_admin, _postgres_admin


def unique_prefix() -> str:
    """A `schema_prefix` no other test (or engineer) on the same server uses."""
    return f"t{uuid.uuid4().hex[:10]}_"


async def server_sql(url: str, statement: str) -> list[object]:
    """Run one statement outside any transaction on `url`'s server (its own database)."""
    if make_url(url).get_backend_name() == "postgresql":
        conn = await _postgres_admin(url)
        try:
            return [row[0] for row in await conn.fetch(statement)]
        finally:
            await conn.close()
    mysql = await _mysql_admin(url)
    try:
        async with mysql.cursor() as cur:
            await cur.execute(statement)
            return [row[0] for row in await cur.fetchall()]
    finally:
        mysql.close()


async def databases(url: str, prefix: str) -> list[str]:
    """The databases on `url`'s server whose names start with `prefix`, sorted."""
    if make_url(url).get_backend_name() == "postgresql":
        query = f"SELECT datname FROM pg_database WHERE datname LIKE '{prefix}%' ORDER BY 1"  # noqa: S608
    else:
        query = (
            "SELECT schema_name FROM information_schema.schemata "  # noqa: S608
            f"WHERE schema_name LIKE '{prefix}%' ORDER BY 1"
        )
    return [str(name) for name in await server_sql(url, query)]


@asynccontextmanager
async def dropped_afterwards(url: str, prefix: str | None = None) -> AsyncIterator[str]:
    """A unique prefix (or `prefix`); on exit, every database on `url`'s server named with it is dropped."""
    prefix = prefix or unique_prefix()
    try:
        yield prefix
    finally:
        postgres = make_url(url).get_backend_name() == "postgresql"
        template = 'DROP DATABASE IF EXISTS "{}" WITH (FORCE)' if postgres else "DROP DATABASE IF EXISTS `{}`"
        names = await databases(url, prefix)
        for start in range(0, len(names), 8):  # a few at a time: the server is shared
            await asyncio.gather(*(server_sql(url, template.format(n)) for n in names[start : start + 8]))
