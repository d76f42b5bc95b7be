"""The tenant follows work started in a request (background tasks, asyncio tasks,
streaming bodies), and `run_as_tenant`/`tenant_task` re-check it before running."""

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import StreamingResponse

from fastapi_tenancy import (
    TenancyManager,
    TenancyMiddleware,
    Tenant,
    TenantInactiveError,
    TenantNotFoundError,
    TenantResolutionError,
    current_tenant,
    current_tenant_or_none,
    tenant_scope,
)
from fastapi_tenancy.background import run_as_tenant, tenant_task

from .apps import Base, descriptions
from .conftest import Tenants


def _app(
    manager: TenancyManager, seen: list[Any], pending: list[asyncio.Task[Any]], gate: asyncio.Event
) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)

    async def record_async(label: str) -> None:
        seen.append((label, current_tenant().identifier, await descriptions(manager)))

    def record_sync(label: str) -> None:
        seen.append(
            (label, current_tenant().identifier, threading.current_thread() is threading.main_thread())
        )

    @app.post("/background")
    async def background(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(record_async, "async-bg")
        tasks.add_task(record_sync, "sync-bg")
        return {"ok": "queued"}

    @tenant_task(manager)
    async def checked(label: str) -> None:
        await record_async(label)

    @app.post("/background-checked")
    async def background_checked(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(checked, "checked-bg")
        return {"ok": "queued"}

    @app.post("/task")
    async def task() -> dict[str, str]:
        async def later() -> None:
            await gate.wait()  # runs after the request has finished
            await record_async("late-task")

        pending.append(asyncio.create_task(later()))
        return {"ok": "started"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for part in range(3):
                await asyncio.sleep(0)
                rows = ",".join(await descriptions(manager))
                yield f"{part}:{current_tenant().identifier}:{rows}\n".encode()

        return StreamingResponse(body())

    @app.get("/stream-sync")
    def stream_sync() -> StreamingResponse:
        def body() -> Iterator[bytes]:
            for part in range(2):
                yield f"{part}:{current_tenant().identifier}\n".encode()

        return StreamingResponse(body())

    return app


@pytest.fixture
def harness(tenants: Tenants) -> tuple[httpx.AsyncClient, list[Any], list[asyncio.Task[Any]], asyncio.Event]:
    seen: list[Any] = []
    pending: list[asyncio.Task[Any]] = []
    gate = asyncio.Event()
    app = _app(tenants.manager, seen, pending, gate)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return client, seen, pending, gate


def _as(tenant: str) -> dict[str, str]:
    return {"X-Tenant-ID": tenant}


async def test_background_tasks_run_as_the_requests_tenant(harness: Any) -> None:
    client, seen, _, _ = harness
    async with client:
        for tenant in ("alpha", "beta", "alpha"):
            response = await client.post("/background", headers=_as(tenant))
            assert response.status_code == 200, response.text
    assert seen == [
        ("async-bg", "alpha", ["alpha-1", "alpha-2"]),
        ("sync-bg", "alpha", False),  # a worker thread, and still alpha
        ("async-bg", "beta", ["beta-1", "beta-3"]),
        ("sync-bg", "beta", False),
        ("async-bg", "alpha", ["alpha-1", "alpha-2"]),
        ("sync-bg", "alpha", False),
    ]
    assert current_tenant_or_none() is None


async def test_a_tenant_task_in_background_tasks_runs_as_the_request_tenant(harness: Any) -> None:
    client, seen, _, _ = harness
    async with client:
        for tenant in ("beta", "alpha"):
            response = await client.post("/background-checked", headers=_as(tenant))
            assert response.status_code == 200, response.text
    assert seen == [
        ("checked-bg", "beta", ["beta-1", "beta-3"]),
        ("checked-bg", "alpha", ["alpha-1", "alpha-2"]),
    ]


async def test_a_task_outliving_its_request_keeps_its_tenant(harness: Any, tenants: Tenants) -> None:
    client, seen, pending, gate = harness
    async with client:
        for tenant in ("alpha", "beta"):
            assert (await client.post("/task", headers=_as(tenant))).status_code == 200
    assert seen == []  # both requests are over; their tasks wait
    assert current_tenant_or_none() is None
    gate.set()
    await asyncio.gather(*pending)
    assert sorted(seen) == [
        ("late-task", "alpha", ["alpha-1", "alpha-2"]),
        ("late-task", "beta", ["beta-1", "beta-3"]),
    ]


async def test_a_task_outliving_its_request_is_refused_once_its_tenant_is_suspended(
    harness: Any, tenants: Tenants
) -> None:
    client, seen, pending, gate = harness
    async with client:
        assert (await client.post("/task", headers=_as("alpha"))).status_code == 200
    await tenants.manager.suspend_tenant("alpha")
    gate.set()
    (outcome,) = await asyncio.gather(*pending, return_exceptions=True)
    assert isinstance(outcome, TenantInactiveError)
    assert seen == []


@pytest.mark.parametrize("path", ["/stream", "/stream-sync"])
async def test_a_streaming_body_runs_as_the_requests_tenant(harness: Any, path: str) -> None:
    client, _, _, _ = harness
    async with client:
        alpha, beta = [await client.get(path, headers=_as(t)) for t in ("alpha", "beta")]
    assert alpha.status_code == beta.status_code == 200
    assert all(":alpha" in line for line in alpha.text.splitlines()), alpha.text
    assert all(":beta" in line for line in beta.text.splitlines()), beta.text
    if path == "/stream":
        assert alpha.text.splitlines()[0] == "0:alpha:alpha-1,alpha-2"
        assert beta.text.splitlines()[-1] == "2:beta:beta-1,beta-3"


async def test_run_as_tenant_runs_async_and_sync_functions_as_the_tenant(tenants: Tenants) -> None:
    manager = tenants.manager
    assert await run_as_tenant(manager, "beta", descriptions, manager) == ["beta-1", "beta-3"]
    alpha = await manager.get_tenant("alpha")
    assert await run_as_tenant(manager, alpha, lambda: current_tenant().identifier) == "alpha"
    assert current_tenant_or_none() is None


@pytest.mark.parametrize("change", ["suspend", "delete", "reregister"])
async def test_run_as_tenant_fails_closed_for_a_tenant_no_longer_served(
    tenants: Tenants, change: str
) -> None:
    manager = tenants.manager
    alpha = await manager.get_tenant("alpha")
    ran: list[str] = []
    if change == "suspend":
        await manager.suspend_tenant(alpha)
        expected: type[Exception] = TenantInactiveError
    elif change == "delete":
        await manager.delete_tenant(alpha)
        expected = TenantInactiveError
    else:  # purged and the slug registered again: a different tenant now
        await manager.delete_tenant(alpha, destroy_data=True)
        await manager.register_tenant("alpha", "Someone else", app_metadata=Base.metadata)
        expected = TenantNotFoundError
    with pytest.raises(expected):
        await run_as_tenant(manager, alpha, ran.append, "ran")
    assert ran == []


async def test_run_as_tenant_refuses_an_unknown_identifier(tenants: Tenants) -> None:
    with pytest.raises(TenantNotFoundError):
        await run_as_tenant(tenants.manager, "gamma", current_tenant)


async def test_tenant_task_takes_the_callers_tenant_and_needs_one(tenants: Tenants) -> None:
    manager = tenants.manager

    @tenant_task(manager)
    async def read(prefix: str) -> list[str]:
        return [prefix + d for d in await descriptions(manager)]

    @tenant_task(manager)
    def whoami() -> str:
        return current_tenant().identifier

    with pytest.raises(TenantResolutionError):  # no tenant: nothing runs
        await read("x")
    beta = await manager.get_tenant("beta")
    with tenant_scope(beta):
        assert await read(">") == [">beta-1", ">beta-3"]
        assert await whoami() == "beta"
        await manager.suspend_tenant(beta)
        with pytest.raises(TenantInactiveError):
            await whoami()


async def test_a_plain_thread_gets_no_tenant_and_fails_closed() -> None:
    outcome: list[object] = []

    def work() -> None:
        try:
            outcome.append(current_tenant())
        except TenantResolutionError as exc:
            outcome.append(exc)

    with tenant_scope(Tenant(identifier="alpha", name="Alpha")):
        thread = threading.Thread(target=work)  # threads start with an empty context
        thread.start()
        thread.join()
        loop_outcome = await asyncio.get_running_loop().run_in_executor(None, current_tenant_or_none)
    assert len(outcome) == 1 and isinstance(outcome[0], TenantResolutionError)
    assert loop_outcome is None  # run_in_executor does not copy the context either
