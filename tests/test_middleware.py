"""TenancyMiddleware: the spec's error table byte for byte, excluded paths, WebSockets, outages."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, WebSocket
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import (
    TenancyConfig,
    TenancyManager,
    TenancyMiddleware,
    TenancyUnavailableError,
)
from fastapi_tenancy.context import current_tenant_or_none
from fastapi_tenancy.storage import InMemoryTenantStore

from .apps import Base, build_app
from .asgi import websocket


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[TenancyManager]:
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    await manager.initialize()
    for slug in ("acme-corp", "sleepy", "gone"):
        await manager.register_tenant(slug, slug, app_metadata=Base.metadata)
    await manager.suspend_tenant("sleepy")
    await manager.delete_tenant("gone")
    yield manager
    await manager.close()


@pytest.fixture
async def client(manager: TenancyManager) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.mark.parametrize(
    ("headers", "status", "body"),
    [
        ({}, 400, b'{"detail": "Tenant identifier missing"}'),
        ({"X-Tenant-ID": ""}, 400, b'{"detail": "Tenant identifier missing"}'),
        ({"X-Tenant-ID": "unknown-co"}, 404, b'{"detail": "Tenant not found"}'),
        ({"X-Tenant-ID": "sleepy"}, 403, b'{"detail": "Tenant is not active (status: suspended)"}'),
        ({"X-Tenant-ID": "gone"}, 403, b'{"detail": "Tenant is not active (status: deleted)"}'),
    ],
    ids=["missing", "empty", "unknown", "suspended", "deleted"],
)
async def test_error_table_of_the_spec(
    client: httpx.AsyncClient, headers: dict[str, str], status: int, body: bytes
) -> None:
    response = await client.get("/orders", headers=headers)
    assert (response.status_code, response.content) == (status, body)
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "identifier",
    [
        "ACME-CORP",
        "acme_corp",
        "-acme",
        "acme-",
        "a" * 64,
        "acme corp",
        "'; DROP TABLE tenants;--",
        "..",
        "acme\x00corp",
        "ácme",
        "pg_catalog",
        "*",
        "x" * 10_000,
    ],
    ids=lambda v: repr(v)[:20],
)
async def test_malformed_identifiers_are_a_plain_404(client: httpx.AsyncClient, identifier: str) -> None:
    # Raw bytes, as a hostile client would send them (UTF-8, NUL and all).
    response = await client.get("/orders", headers=[(b"X-Tenant-ID", identifier.encode())])
    assert (response.status_code, response.content) == (404, b'{"detail": "Tenant not found"}')


async def test_conflicting_duplicate_headers_are_refused(client: httpx.AsyncClient) -> None:
    response = await client.get("/orders", headers=[("X-Tenant-ID", "acme-corp"), ("X-Tenant-ID", "sleepy")])
    assert (response.status_code, response.json()) == (400, {"detail": "Tenant identifier ambiguous"})
    same = await client.get("/orders", headers=[("X-Tenant-ID", "acme-corp"), ("X-Tenant-ID", "acme-corp")])
    assert same.status_code == 200


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("/health", True),
        ("/health/", True),
        ("/health/live", True),
        ("/healthz", False),
        ("/healthy/x", False),
        ("/docs", True),
        ("/openapi.json", True),
        ("/redoc", True),
        ("/docsx", False),
        ("/orders", False),
    ],
)
async def test_excluded_paths_match_whole_segments(
    client: httpx.AsyncClient, path: str, excluded: bool
) -> None:
    response = await client.get(path)
    if excluded:
        assert response.status_code != 400, response.text
    else:
        assert (response.status_code, response.json()) == (400, {"detail": "Tenant identifier missing"})


async def test_docs_can_be_put_behind_tenancy(manager: TenancyManager) -> None:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager, exclude_docs=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/openapi.json")).status_code == 400
        assert (await client.get("/openapi.json", headers={"X-Tenant-ID": "acme-corp"})).status_code == 200


async def test_excluded_path_with_a_tenant_dependency_is_a_400_not_a_500(manager: TenancyManager) -> None:
    from fastapi_tenancy.dependencies import CurrentTenant, make_tenant_db_dependency

    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/public"])

    get_db = make_tenant_db_dependency(manager)

    @app.get("/public/who")
    async def who(tenant: CurrentTenant) -> str:
        return tenant.identifier

    @app.get("/public/orders")
    async def orders(session: Annotated[AsyncSession, Depends(get_db)]) -> int:
        return len((await session.execute(sa.text("SELECT 1"))).all())

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for path in ("/public/who", "/public/orders"):
            response = await client.get(path)
            assert (response.status_code, response.json()) == (400, {"detail": "Tenant identifier missing"})


async def test_tenant_context_is_reset_after_each_request(client: httpx.AsyncClient) -> None:
    assert (await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})).status_code == 200
    assert current_tenant_or_none() is None


async def test_tenancy_errors_raised_by_the_app_keep_their_status(manager: TenancyManager) -> None:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)

    @app.get("/lookup/{slug}")
    async def lookup(slug: str) -> str:
        return (await manager.get_tenant(slug)).name

    @app.get("/down")
    async def down() -> None:
        raise TenancyUnavailableError("test outage")

    headers = {"X-Tenant-ID": "acme-corp"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        missing = await client.get("/lookup/nobody", headers=headers)
        assert (missing.status_code, missing.content) == (404, b'{"detail": "Tenant not found"}')
        outage = await client.get("/down", headers=headers)
        assert (outage.status_code, outage.json()) == (503, {"detail": "Tenancy backend unavailable"})
        assert outage.headers["retry-after"] == "1"


class _BrokenStore(InMemoryTenantStore):
    async def get_by_identifier(self, identifier: str) -> None:
        raise TenancyUnavailableError("registry down")


async def test_registry_outage_is_a_503_never_a_500(tmp_path: Path) -> None:
    manager = TenancyManager(TenancyConfig(database_url="sqlite://"), _BrokenStore())
    app = build_app(manager)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
    assert (response.status_code, response.json()) == (503, {"detail": "Tenancy backend unavailable"})
    await manager.close()


async def test_websockets_are_resolved_and_refused_like_http(manager: TenancyManager) -> None:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        tenant = current_tenant_or_none()
        await socket.send_text(tenant.identifier if tenant else "none")
        await socket.close()

    accepted = await websocket(app, [("X-Tenant-ID", "acme-corp")])
    assert [m["type"] for m in accepted] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert accepted[1]["text"] == "acme-corp"
    for headers, reason in [
        ([], "Tenant identifier missing"),
        ([("X-Tenant-ID", "nobody")], "Tenant not found"),
        ([("X-Tenant-ID", "sleepy")], "Tenant is not active (status: suspended)"),
    ]:
        assert await websocket(app, headers) == [{"type": "websocket.close", "code": 1008, "reason": reason}]


async def test_websocket_refusals_are_real_http_responses_where_the_server_allows(
    manager: TenancyManager,
) -> None:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)
    sent = await websocket(app, [("X-Tenant-ID", "nobody")], extensions={"websocket.http.response": {}})
    assert [m["type"] for m in sent] == ["websocket.http.response.start", "websocket.http.response.body"]
    assert (sent[0]["status"], sent[1]["body"]) == (404, b'{"detail": "Tenant not found"}')


async def test_tenancy_errors_on_excluded_paths_keep_their_status(manager: TenancyManager) -> None:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/admin"])

    @app.get("/admin/tenants/{slug}")
    async def show(slug: str) -> str:
        return (await manager.get_tenant(slug)).name

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/admin/tenants/acme-corp")).json() == "acme-corp"
        missing = await client.get("/admin/tenants/nobody")
    assert (missing.status_code, missing.content) == (404, b'{"detail": "Tenant not found"}')


# -- maintenance -----------------------------------------------------------------------------


async def test_a_tenant_in_maintenance_gets_a_503_with_retry_after(
    manager: TenancyManager, client: httpx.AsyncClient
) -> None:
    headers = {"X-Tenant-ID": "acme-corp"}
    await manager.start_maintenance("acme-corp")
    response = await client.get("/orders", headers=headers)
    assert (response.status_code, response.content) == (503, b'{"detail": "Tenant is under maintenance"}')
    assert response.headers.get_list("retry-after") == ["120"]  # the setting's, once
    # Excluded paths still answer; other tenants are untouched.
    assert (await client.get("/health")).status_code == 200
    await manager.end_maintenance("acme-corp")
    assert (await client.get("/orders", headers=headers)).status_code == 200, response.text


async def test_the_maintenance_answer_is_configured_and_beats_anti_enumeration(tmp_path: Path) -> None:
    config = TenancyConfig(
        database_url=f"sqlite:///{tmp_path / 'app.db'}",
        anti_enumeration=True,
        maintenance_message="Moving to a new home; back by 14:00 UTC",
        maintenance_retry_after=900,
    )
    manager = TenancyManager(config)
    await manager.initialize()
    try:
        for slug in ("moving", "sleepy"):
            await manager.register_tenant(slug, slug, app_metadata=Base.metadata)
        await manager.start_maintenance("moving")
        await manager.suspend_tenant("sleepy")
        transport = httpx.ASGITransport(app=build_app(manager))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            moving = await client.get("/orders", headers={"X-Tenant-ID": "moving"})
            sleepy = await client.get("/orders", headers={"X-Tenant-ID": "sleepy"})
        assert (moving.status_code, moving.json()) == (
            503,
            {"detail": "Moving to a new home; back by 14:00 UTC"},
        )
        assert moving.headers["retry-after"] == "900"
        assert (sleepy.status_code, sleepy.json()) == (404, {"detail": "Tenant not found"})
    finally:
        await manager.close()


async def test_a_request_that_began_before_the_maintenance_gets_no_session(manager: TenancyManager) -> None:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)

    @app.get("/slow")
    async def slow() -> int:
        # The maintenance starts after the request was admitted, before it opens a session.
        await manager.start_maintenance("acme-corp")
        async with manager.session() as session:
            return len((await session.execute(sa.text("SELECT 1"))).all())

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/slow", headers={"X-Tenant-ID": "acme-corp"})
    assert (response.status_code, response.json()) == (503, {"detail": "Tenant is under maintenance"})
    assert response.headers["retry-after"] == "120"
    # The operator's own work still reaches the tenant's data.
    async with manager.session("acme-corp", during_maintenance=True) as session:
        assert (await session.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one() == 0


async def test_a_websocket_of_a_tenant_in_maintenance_is_told_to_try_again_later(
    manager: TenancyManager,
) -> None:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)
    await manager.start_maintenance("acme-corp")
    closed = await websocket(app, [("X-Tenant-ID", "acme-corp")])
    assert closed == [{"type": "websocket.close", "code": 1013, "reason": "Tenant is under maintenance"}]
