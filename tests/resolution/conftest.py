"""A real ASGI app per strategy, four tenants (two active, one suspended, one deleted),
and what a WebSocket the app accepted ran as (`tests/asgi.py` drives the handshake)."""

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, WebSocket

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware
from fastapi_tenancy.context import current_tenant_or_none
from fastapi_tenancy.dependencies import CurrentTenant, TokenClaims
from fastapi_tenancy.resolution import Resolver
from fastapi_tenancy.storage import InMemoryTenantStore

# Every test app knows these: acme and globex are served, sleepy is suspended, gone deleted.
TENANTS = ("acme", "globex", "sleepy", "gone")

Build = Callable[..., AbstractAsyncContextManager[tuple[httpx.AsyncClient, FastAPI, TenancyManager]]]


def build_app(manager: TenancyManager) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/health"])

    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.get("/whoami", name="whoami")
    async def whoami(tenant: CurrentTenant, request: Request) -> dict[str, str]:
        return {
            "tenant": tenant.identifier,
            "url": str(request.url),
            "url_for": str(request.url_for("whoami")),
            "root_path": request.scope.get("root_path", ""),
        }

    @app.get("/admin")
    async def admin(tenant: CurrentTenant) -> str:
        return f"admin of {tenant.identifier}"

    @app.get("/claims")
    async def claims(claims: TokenClaims) -> dict[str, Any]:
        return claims

    @app.get("/health/claims")  # excluded: no tenant, so no token was verified either
    async def health_claims(claims: TokenClaims) -> dict[str, Any]:
        return claims

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        tenant = current_tenant_or_none()
        await websocket.send_text(tenant.identifier if tenant else "none")
        await websocket.close()

    return app


@asynccontextmanager
async def _build(
    config: TenancyConfig | None = None,
    *,
    resolver: Resolver | None = None,
    store: InMemoryTenantStore | None = None,
    base_url: str = "http://app.test",
    client_addr: tuple[str, int] = ("203.0.113.7", 50000),
    **settings: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, TenancyManager]]:
    if config is None:
        config = TenancyConfig(database_url="sqlite://", **settings)
    manager = TenancyManager(config, store or InMemoryTenantStore(), resolver=resolver)
    await manager.initialize()
    for slug in TENANTS:
        await manager.register_tenant(slug, slug.title())
    await manager.suspend_tenant("sleepy")
    await manager.delete_tenant("gone")
    app = build_app(manager)
    transport = httpx.ASGITransport(app=app, client=client_addr)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client, app, manager
    finally:
        await manager.close()


@pytest.fixture
def build() -> Build:
    """`async with build(resolution_strategy=..., ...) as (client, app, manager)`."""
    return _build


def accepted_as(sent: list[dict[str, Any]]) -> str | None:
    """The tenant a WebSocket ran as, or None if it was refused."""
    if sent and sent[0]["type"] == "websocket.accept":
        return str(sent[1]["text"])
    assert sent and sent[0]["type"] == "websocket.close", sent
    return None
