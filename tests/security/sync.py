"""Running the async library from synchronous Hypothesis tests: a dedicated event loop,
and a fresh database per example."""

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ..conftest import MYSQL_URL, POSTGRES_URL, _mysql_admin, _postgres_admin, _require

__all__ = ["fresh_database", "new_runner"]


def new_runner() -> asyncio.Runner:
    """An event loop of its own; the global one (pytest-asyncio's) is left alone."""
    return asyncio.Runner(loop_factory=asyncio.new_event_loop)


@contextmanager
def fresh_database(runner: asyncio.Runner, backend: str) -> Iterator[str]:
    """The URL of a new, empty database on `backend` ("postgres", "mysql" or "sqlite"), removed afterwards.

    On MySQL/MariaDB every database whose name starts with the new one's is dropped too:
    name tenant databases after it (`schema_prefix=<its name>_`).
    """
    if backend == "sqlite":
        directory = Path(tempfile.mkdtemp(prefix="ft-sm-"))
        try:
            yield f"sqlite+aiosqlite:///{directory / 'app.db'}"
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    name = f"ft_sm_{uuid.uuid4().hex[:12]}"
    if backend == "mysql":
        runner.run(_require("MySQL", lambda: _mysql_admin(MYSQL_URL)))
        runner.run(_mysql(f"CREATE DATABASE `{name}`"))
        try:
            yield make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            runner.run(_drop_mysql_databases(name))
        return
    runner.run(_require("PostgreSQL", lambda: _postgres_admin(POSTGRES_URL)))
    runner.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        runner.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(statement: str) -> None:
    admin = await _postgres_admin(POSTGRES_URL)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def _mysql(statement: str) -> list[Any]:
    admin = await _mysql_admin(MYSQL_URL)
    try:
        async with admin.cursor() as cursor:
            await cursor.execute(statement)
            return list(await cursor.fetchall())
    finally:
        admin.close()


async def _drop_mysql_databases(prefix: str) -> None:
    # `prefix` is ours (ft_sm_ and hex digits); its underscores are escaped for LIKE.
    pattern = prefix.replace("_", "\\_") + "%"
    query = f"SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE '{pattern}'"  # noqa: S608
    for (name,) in await _mysql(query):
        await _mysql(f"DROP DATABASE IF EXISTS `{name}`")
