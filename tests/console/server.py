"""The app the browser tests serve with uvicorn: tenant routes, metrics, and the console at /_tenancy.

Configured from `TENANCY_*` variables like a deployment. The operator logs in with HTTP
Basic (`alice` / `secret`): the console takes whatever auth dependency the app has.
"""

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware, current_tenant
from fastapi_tenancy.dependencies import make_tenant_db_dependency
from fastapi_tenancy.metrics import TenantMetrics, TenantMetricsMiddleware
from tests.apps import Base, Order

manager = TenancyManager(TenancyConfig())
metrics = TenantMetrics(registry=CollectorRegistry())
metrics.count_refusals(manager.rate_limiter)
basic = HTTPBasic(realm="operators")


def operator(credentials: Annotated[HTTPBasicCredentials, Depends(basic)]) -> str:
    if not (
        secrets.compare_digest(credentials.username, "alice")
        and secrets.compare_digest(credentials.password, "secret")
    ):
        raise HTTPException(401, "Not an operator", headers={"WWW-Authenticate": 'Basic realm="operators"'})
    return credentials.username


console = manager.console(auth=operator, metrics=metrics, app_metadata=Base.metadata, traffic_interval=1.0)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await manager.initialize()
    yield
    await console.close()
    await manager.close()


app = FastAPI(lifespan=lifespan)
app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/health", "/_tenancy"])
app.add_middleware(TenantMetricsMiddleware, metrics=metrics)
app.mount("/_tenancy", console)
get_db = make_tenant_db_dependency(manager)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/orders")
async def orders(session: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, Any]:
    rows = (await session.execute(select(Order))).scalars().all()
    return {"tenant": current_tenant().identifier, "orders": [row.description for row in rows]}
