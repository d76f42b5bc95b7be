"""The test app as a server process would load it: `uvicorn tests.security.served_app:app`.

Configured from `TENANCY_*` variables (TenancyConfig reads them), started and stopped
by the lifespan, as in production.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.context import current_tenant_or_none

from ..apps import build_app

manager = TenancyManager(TenancyConfig())


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    await manager.initialize()
    yield
    await manager.close()


app = build_app(manager)
app.router.lifespan_context = _lifespan


@app.get("/health/tenant")
async def tenant_in_context() -> dict[str, str | None]:
    """Excluded from resolution: which tenant, if any, this request's context holds."""
    tenant = current_tenant_or_none()
    return {"tenant": tenant.identifier if tenant is not None else None}
