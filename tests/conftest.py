"""Fixtures for real servers: a fresh PostgreSQL or MySQL database per test, or a SQLite file.

Server URLs come from TENANCY_TEST_POSTGRES_URL and TENANCY_TEST_MYSQL_URL (local
defaults below). Without the server a test skips with the reason, unless
TENANCY_TEST_REQUIRE_SERVICES=1 (CI), where it fails.
"""

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get(
    "TENANCY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("TENANCY_TEST_MYSQL_URL", "mysql+aiomysql://root@127.0.0.1:3306/test")
REQUIRE_SERVICES = os.environ.get("TENANCY_TEST_REQUIRE_SERVICES") == "1"

_reachable: dict[str, str | None] = {}


async def _postgres_admin(url: str) -> Any:
    import asyncpg

    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password,
        database=parsed.database or "postgres",
        timeout=5,
    )


async def _mysql_admin(url: str) -> Any:
    import aiomysql

    parsed = make_url(url)
    return await aiomysql.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        autocommit=True,
        connect_timeout=5,
    )


async def _require(name: str, connect: Callable[[], Awaitable[Any]]) -> None:
    """Skip (or, with TENANCY_TEST_REQUIRE_SERVICES=1, fail) when `name` is not reachable."""
    if name not in _reachable:
        try:
            conn = await connect()
            result = conn.close()
            if asyncio.iscoroutine(result):
                await result
            _reachable[name] = None
        except Exception as exc:  # any failure to connect means "not reachable"
            _reachable[name] = f"{type(exc).__name__}: {exc}"
    reason = _reachable[name]
    if reason is None:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is required (TENANCY_TEST_REQUIRE_SERVICES=1): {reason}")
    pytest.skip(f"{name} not reachable: {reason}")


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """The URL of a brand-new, empty PostgreSQL database, dropped after the test."""
    await _require("PostgreSQL", lambda: _postgres_admin(POSTGRES_URL))
    name = f"ft_{uuid.uuid4().hex[:12]}"
    admin = await _postgres_admin(POSTGRES_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    admin = await _postgres_admin(POSTGRES_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def mysql_url() -> AsyncIterator[str]:
    """The URL of a brand-new, empty MySQL/MariaDB database, dropped after the test."""
    await _require("MySQL", lambda: _mysql_admin(MYSQL_URL))
    name = f"ft_{uuid.uuid4().hex[:12]}"
    admin = await _mysql_admin(MYSQL_URL)
    try:
        async with admin.cursor() as cur:
            await cur.execute(f"CREATE DATABASE `{name}`")
    finally:
        admin.close()
    yield make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
    admin = await _mysql_admin(MYSQL_URL)
    try:
        async with admin.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a SQLite registry file in a fresh directory."""
    yield f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
