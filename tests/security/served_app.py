"""The test app as a server process would load it: `uvicorn tests.security.served_app:app`.

Configured from `TENANCY_*` variables (TenancyConfig reads them), started and stopped
by the lifespan, as in production.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from fastapi_tenancy import TenancyConfig, TenancyManager

from ..apps import build_app

manager = TenancyManager(TenancyConfig())


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    await manager.initialize()
    yield
    await manager.close()


app = build_app(manager)
app.router.lifespan_context = _lifespan
