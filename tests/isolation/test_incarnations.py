"""Tenant incarnations: a request of tenant `reuse` is in flight while the tenant is deleted
with its data and the slug registered again for a new customer. The old request must
never read or write the new customer's rows, whatever the strategy."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from fastapi_tenancy import TenancyUnavailableError, TenantNotFoundError
from fastapi_tenancy.isolation import _incarnation

from .test_matrix import Env, _environment, _setup

SETUPS = ["postgres", "rls", "hybrid", "postgres-database"]


@pytest.fixture(params=SETUPS)
def incarnation_setup(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    url, settings = _setup(request, request.param)
    # Room for the deletion's own connection while the old request holds one.
    return url, {**settings, "database_pool_size": 3}


@pytest.fixture
async def env(incarnation_setup: tuple[str, dict[str, Any]]) -> AsyncIterator[Env]:
    async with _environment(*incarnation_setup) as environment:
        yield environment


async def _descriptions(session: Any, env: Env) -> list[str]:
    rows = (await session.execute(sa.select(env.model.description).order_by(env.model.id))).scalars()
    return list(rows)


async def test_an_old_incarnation_never_reaches_the_new_one(env: Env) -> None:
    manager = env.manager
    await env.seed("reuse", {1: "old-1", 2: "old-2"})
    old = await manager.get_tenant("reuse")
    async with manager.session(old) as session:
        # The old request's transaction has begun and touched nothing yet.
        await session.execute(sa.text("SELECT 1"))
        deletion = asyncio.create_task(manager.delete_tenant(old, destroy_data=True))
        await asyncio.sleep(0.5)
        if env.strategy == "database":
            # Dropped WITH (FORCE): the open transaction ends with its connection.
            with pytest.raises((TenancyUnavailableError, sa_exc.DBAPIError)):
                await _descriptions(session, env)
            await session.rollback()
        else:
            if env.strategy != "hybrid":  # (hybrid: whichever tier took the tenant)
                # Destruction waits for the open transaction: DROP SCHEMA would not, nor
                # would the DELETE of row-level security before the write below.
                assert not deletion.done()
            assert await _descriptions(session, env) == ["old-1", "old-2"]
            session.add(env.model(id=3, description="old-3"))  # a slow write of the old request
            await session.commit()
        await deletion

        await env.seed("reuse", {1: "new-1"})
        new = await manager.get_tenant("reuse")
        assert new.id != old.id

        # The old request goes on: its next transaction must not reach the new storage.
        try:
            seen = await _descriptions(session, env)
        except TenantNotFoundError:
            seen = []
        assert seen == [], "the old incarnation read the new one's rows"
        await session.rollback()
        session.add(env.model(id=9, description="old-late"))
        try:
            await session.commit()
        except (TenantNotFoundError, sa_exc.DBAPIError):
            await session.rollback()

    async with manager.session(new) as session:
        assert await _descriptions(session, env) == ["new-1"]
    for tenant, rows in (("alpha", ["alpha-1", "alpha-2"]), ("beta", ["beta-1", "beta-3"])):
        async with manager.session(await manager.get_tenant(tenant)) as session:
            assert await _descriptions(session, env) == rows


async def test_a_session_of_the_old_incarnation_is_refused(env: Env) -> None:
    await env.seed("reuse", {1: "old-1"})
    old = await env.manager.get_tenant("reuse")
    await env.manager.delete_tenant(old, destroy_data=True)
    await env.seed("reuse", {1: "new-1"})
    with pytest.raises(TenantNotFoundError):  # the manager asks the registry first
        async with env.manager.session(old):
            pass
    # Below the manager, the storage itself refuses (row-level security: bound by id).
    async with await env.manager.isolation.session(old) as session:
        try:
            assert await _descriptions(session, env) == []
        except TenantNotFoundError:
            pass
    response = await env.get("reuse", "/orders")
    assert [o["description"] for o in response.json()["orders"]] == ["new-1"]


async def test_destruction_ends_a_transaction_that_outstays_the_wait(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env.strategy != "schema":
        pytest.skip("the wait-then-terminate of DROP SCHEMA")
    monkeypatch.setattr(_incarnation, "DESTROY_WAIT", "300ms")
    await env.seed("reuse", {1: "old-1"})
    old = await env.manager.get_tenant("reuse")
    async with env.manager.session(old) as session:
        await session.execute(sa.text("SELECT 1"))  # begun; then idle in transaction
        await asyncio.wait_for(env.manager.delete_tenant(old, destroy_data=True), timeout=10)
        with pytest.raises((TenancyUnavailableError, sa_exc.DBAPIError)):
            await _descriptions(session, env)  # its backend was terminated
        await session.rollback()
    assert [t.identifier for t in await env.manager.list_tenants()] == ["alpha", "beta"]
