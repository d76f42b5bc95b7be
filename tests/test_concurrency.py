"""The per-tenant concurrency cap: one tenant flooding slow requests leaves the shared pool to others."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import TenancyConfig, TenancyManager, Tenant
from fastapi_tenancy.concurrency import TenantConcurrencyGate
from fastapi_tenancy.dependencies import make_tenant_db_dependency
from fastapi_tenancy.errors import TenantBusyError

from .apps import Base, Order, build_app

SLOW = 1.0  # seconds of pg_sleep per slow request (wide margins on a loaded machine)


async def _app(postgres_url: str, cap: int, wait: float) -> tuple[TenancyManager, FastAPI]:
    # A pool of two connections, shared by both tenants (schema isolation).
    config = TenancyConfig(
        database_url=postgres_url,
        database_pool_size=2,
        database_max_overflow=0,
        database_pool_timeout=5,
        tenant_max_concurrent_requests=cap,
        tenant_concurrency_wait=wait,
    )
    manager = TenancyManager(config)
    await manager.initialize()
    for identifier, rows in {"alpha": {1: "alpha-1"}, "beta": {1: "beta-1", 2: "beta-2"}}.items():
        tenant = await manager.register_tenant(identifier, identifier.title(), app_metadata=Base.metadata)
        async with manager.session(tenant) as session:
            session.add_all(Order(id=i, description=d) for i, d in rows.items())
            await session.commit()
    app = build_app(manager)
    get_db = make_tenant_db_dependency(manager)

    @app.get("/slow")
    async def slow(session: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, Any]:
        await session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": SLOW})
        rows = (await session.execute(sa.select(Order.description).order_by(Order.id))).scalars().all()
        return {"orders": list(rows)}

    return manager, app


@pytest.fixture
async def capped(postgres_url: str) -> AsyncIterator[tuple[TenancyManager, httpx.AsyncClient]]:
    manager, app = await _app(postgres_url, cap=1, wait=0)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield manager, client
    finally:
        await manager.close()


async def test_requests_over_the_cap_are_refused_with_429_and_others_are_served(
    capped: tuple[TenancyManager, httpx.AsyncClient],
) -> None:
    _, client = capped
    alpha, beta = {"X-Tenant-ID": "alpha"}, {"X-Tenant-ID": "beta"}
    flood = [asyncio.create_task(client.get("/slow", headers=alpha)) for _ in range(4)]
    await asyncio.sleep(SLOW / 4)
    began = time.monotonic()
    quiet = await client.get("/orders", headers=beta)  # alpha holds one connection of two
    quiet_seconds = time.monotonic() - began
    answers = await asyncio.gather(*flood)
    assert quiet.status_code == 200
    assert quiet.json()["orders"] == [{"id": 1, "description": "beta-1"}, {"id": 2, "description": "beta-2"}]
    assert quiet_seconds < SLOW  # never waited behind alpha's sleeping requests
    assert sorted(r.status_code for r in answers) == [200, 429, 429, 429]
    served = next(r for r in answers if r.status_code == 200)
    assert served.json() == {"orders": ["alpha-1"]}  # alpha's own row, not beta's id 1
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json() == {"detail": "Too many concurrent requests for tenant alpha"}
    assert refused.headers["retry-after"] == "1"
    # Once alpha's request has ended, its slot is free again.
    assert (await client.get("/orders", headers=alpha)).status_code == 200


async def test_without_a_cap_the_flood_takes_the_pool_from_the_quiet_tenant(postgres_url: str) -> None:
    # The control: the same flood, no cap: beta waits for alpha's sleeps to end.
    config = TenancyConfig(database_url=postgres_url, database_pool_size=2, database_max_overflow=0)
    manager = TenancyManager(config)
    await manager.initialize()
    try:
        for identifier in ("alpha", "beta"):
            await manager.register_tenant(identifier, identifier.title(), app_metadata=Base.metadata)
        app = build_app(manager)
        get_db = make_tenant_db_dependency(manager)

        @app.get("/slow")
        async def slow(session: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, str]:
            await session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": SLOW})
            return {}

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            flood = [
                asyncio.create_task(client.get("/slow", headers={"X-Tenant-ID": "alpha"})) for _ in range(4)
            ]
            await asyncio.sleep(SLOW / 4)
            began = time.monotonic()
            quiet = await client.get("/orders", headers={"X-Tenant-ID": "beta"})
            quiet_seconds = time.monotonic() - began
            assert [r.status_code for r in await asyncio.gather(*flood)] == [200] * 4
        assert quiet.status_code == 200
        assert quiet_seconds > SLOW / 2
    finally:
        await manager.close()


async def test_a_wait_queues_requests_over_the_cap_in_turn(postgres_url: str) -> None:
    manager, app = await _app(postgres_url, cap=1, wait=10)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            began = time.monotonic()
            answers = await asyncio.gather(
                *(client.get("/slow", headers={"X-Tenant-ID": "alpha"}) for _ in range(3))
            )
            seconds = time.monotonic() - began
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert seconds >= 3 * SLOW * 0.9  # one at a time, though the pool had two connections
    finally:
        await manager.close()


def _tenant(identifier: str) -> Tenant:
    return Tenant(identifier=identifier, name=identifier)


async def test_a_waiter_that_times_out_or_is_cancelled_leaves_no_slot_behind() -> None:
    gate = TenantConcurrencyGate(1, wait=0.05)
    acme, other = _tenant("acme"), _tenant("other")
    await gate.acquire(acme)
    await gate.acquire(other)  # another tenant's slots are its own
    with pytest.raises(TenantBusyError):
        await gate.acquire(acme)
    gate.wait = 5
    waiting = asyncio.create_task(gate.acquire(acme))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    queued = asyncio.create_task(gate.acquire(acme))
    await asyncio.sleep(0.01)
    gate.release(acme)  # handed to the queued request, not lost to the cancelled one
    await asyncio.wait_for(queued, 1)
    assert gate.in_flight(acme) == 1
    gate.release(acme)
    gate.release(other)
    assert gate.in_flight(acme) == gate.in_flight(other) == 0
    assert not gate._in_flight and not gate._waiters  # idle tenants hold no state


async def test_excluded_paths_are_not_counted(postgres_url: str) -> None:
    manager, app = await _app(postgres_url, cap=1, wait=0)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            slow = asyncio.create_task(client.get("/slow", headers={"X-Tenant-ID": "alpha"}))
            await asyncio.sleep(SLOW / 4)
            assert (await client.get("/health")).status_code == 200
            assert (await slow).status_code == 200
    finally:
        await manager.close()
