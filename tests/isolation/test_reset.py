"""The connection reset at a tenant's `BEGIN` is skipped only when nothing ran since the last one.

A tenant transaction always ends with the reset (in its `COMMIT`/`ROLLBACK` message); it
begins with it too unless the driver ran nothing on the connection since. Each way of
leaving session state on the connection outside a tenant transaction (route code after its
commit: the driver's simple query, extended query, a statement it prepared before the
commit, `COPY`; code outside tenant sessions on the manager's engine) must make the next
tenant transaction carry the reset, and find no trace of that state. Pool of ONE
connection: every session below runs on the same physical connection; alpha and beta
have overlapping primary keys.
"""

import io
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import TenancyManager, Tenant

from ..apps import Order
from ..conftest import Tenants

LEAK = "SELECT set_config('ft.leak', 'left over', false)"
TEMP = "CREATE TEMP TABLE orders (id int, description text); INSERT INTO orders VALUES (1, 'leak')"


@pytest.fixture
def begins(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The `BEGIN` messages sent, as the server receives them."""
    sent: list[str] = []
    execute = asyncpg.Connection.execute

    async def spy(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        if query.startswith("BEGIN"):
            sent.append(query)
        return await execute(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "execute", spy)
    yield sent


@dataclass
class Env:
    manager: TenancyManager
    tenant: dict[str, Tenant]


@pytest.fixture
async def env(tenants: Tenants) -> Env:
    # Looked up once: the registry shares the one pooled connection in this set-up, and
    # its queries would count as something run between two tenant transactions.
    found = {name: await tenants.manager.store.get_by_identifier(name) for name in ("alpha", "beta")}
    return Env(tenants.manager, {name: t for name, t in found.items() if t is not None})


async def _read(env: Env, identifier: str) -> tuple[list[str], Any]:
    """The tenant's orders, and the leaked setting as its transaction sees it."""
    async with await env.manager.isolation.session(env.tenant[identifier]) as session:
        orders = (await session.scalars(sa.select(Order).order_by(Order.id))).all()
        leak = await session.scalar(sa.text("SELECT current_setting('ft.leak', true)"))
        return [o.description for o in orders], leak


async def _driver(session: AsyncSession) -> Any:
    connection = await session.connection()  # no statement yet: not inside a transaction
    raw = await connection.get_raw_connection()
    return raw.driver_connection


async def test_back_to_back_tenant_transactions_reset_once(env: Env, begins: list[str]) -> None:
    # The pool's connection is new: its first BEGIN resets. Sessions come from the isolation
    # as on the request path (`manager.session()` may also read the registry, which shares
    # the one pooled connection in this set-up, e.g. after a late invalidation message).
    await _read(env, "alpha")
    await _read(env, "beta")
    assert "RESET ALL" in begins[0]
    begins.clear()
    for identifier in ("alpha", "beta", "alpha"):
        assert await _read(env, identifier) == (
            ["beta-1", "beta-3"] if identifier == "beta" else ["alpha-1", "alpha-2"],
            None,
        )
    assert [("RESET ALL" in b) for b in begins] == [False, False, False]


async def _simple(driver: Any) -> None:
    await driver.execute(f"{LEAK}; {TEMP}")


async def _extended(driver: Any) -> None:
    await driver.fetchval(LEAK)
    await driver.fetch(TEMP.split(";")[0])
    await driver.fetch(TEMP.split(";")[1])


async def _copy(driver: Any) -> None:
    await driver.copy_from_query(LEAK, output=io.BytesIO())
    await driver.execute(TEMP)  # (COPY cannot create a table; the setting is the COPY's)


LEAKS: dict[str, Callable[[Any], Awaitable[None]]] = {
    "simple query": _simple,
    "extended query": _extended,
    "copy": _copy,
}


@pytest.mark.parametrize("way", LEAKS)
async def test_raw_driver_work_after_a_commit_is_reset_at_the_next_begin(
    env: Env, begins: list[str], way: str
) -> None:
    await _read(env, "beta")
    async with await env.manager.isolation.session(env.tenant["alpha"]) as session:
        await session.execute(sa.select(Order))
        await session.commit()  # the reset, sent with COMMIT
        await LEAKS[way](await _driver(session))  # then session state, outside any transaction
    begins.clear()
    assert await _read(env, "beta") == (["beta-1", "beta-3"], "")
    assert "RESET ALL" in begins[0]


async def test_a_statement_prepared_before_the_commit_and_run_after_it_is_reset(
    env: Env, begins: list[str]
) -> None:
    async with await env.manager.isolation.session(env.tenant["alpha"]) as session:
        await session.execute(sa.select(Order))
        driver = await _driver(session)
        prepared = await driver.prepare(LEAK)  # inside alpha's transaction
        await session.commit()
        await _driver(session)  # the same connection, checked out again, no transaction
        await prepared.fetchval()
    begins.clear()
    assert await _read(env, "beta") == (["beta-1", "beta-3"], "")
    assert "RESET ALL" in begins[0]


async def test_code_outside_tenant_sessions_is_reset_at_the_next_begin(env: Env, begins: list[str]) -> None:
    await _read(env, "alpha")
    async with env.manager.engine.connect() as conn:
        await conn.execute(sa.text(LEAK))
        for statement in TEMP.split(";"):
            await conn.exec_driver_sql(statement)
        await conn.commit()
    begins.clear()
    assert await _read(env, "alpha") == (["alpha-1", "alpha-2"], "")
    assert "RESET ALL" in begins[0]
