"""The Quick Start app with its isolation strategy taken from the environment.

`examples/quickstart/main.py` passes `isolation_strategy="schema"` to `TenancyConfig`,
and keyword arguments win over `TENANCY_*` variables, so `overhead.py` cannot switch
it to another strategy. This file is the Quick Start with two differences, both
forced by the strategy:

- `TenancyConfig(resolution_strategy="header")`: every other setting comes from the
  environment (`TENANCY_DATABASE_URL`, `TENANCY_ISOLATION_STRATEGY`,
  `TENANCY_DATABASE_OWNER_URL`, `TENANCY_HYBRID_DEFAULT_TIER`, ...).
- With `rls` and `hybrid`, `Order` carries the tenant column that shared tables need
  (as in docs/isolation.md: it leads the primary key, and the server fills it).

The middleware, the dependencies and `GET /orders` are the Quick Start's, word for
word; `POST /orders` is left out (the benchmark does not call it).
"""

from contextlib import asynccontextmanager
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware, Tenant
from fastapi_tenancy.dependencies import get_current_tenant, make_tenant_db_dependency
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

config = TenancyConfig(resolution_strategy="header")  # the rest from TENANCY_* variables
SHARED = config.isolation_strategy in ("rls", "hybrid")


# Database models
class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    if SHARED:
        tenant_id: Mapped[str] = mapped_column(
            sa.String(36), primary_key=True, server_default=sa.FetchedValue()
        )
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False if SHARED else "auto")
    description: Mapped[str] = mapped_column(sa.String(200) if SHARED else sa.String())


# fastapi-tenancy setup. With rls, hybrid (and tenant roles) the registry belongs to the owner role: the
# manager's own store (on database_owner_url) keeps it, as docs/isolation.md shows.
store = None if SHARED or config.database_owner_url else SQLAlchemyTenantStore(config.database_url)
manager = TenancyManager(config, store)


# FastAPI app
@asynccontextmanager
async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
    await manager.initialize()
    yield
    await manager.close()


app = FastAPI(title="My SaaS App", lifespan=lifespan)
app.add_middleware(
    TenancyMiddleware,
    manager=manager,
    excluded_paths=["/health"],
)

# Dependency
get_db = make_tenant_db_dependency(manager)


# Routes
@app.get("/health")
async def health():  # type: ignore[no-untyped-def]
    return {"status": "ok"}


@app.get("/orders")
async def list_orders(  # type: ignore[no-untyped-def]
    tenant: Annotated[Tenant, Depends(get_current_tenant)],
    session: Annotated[AsyncSession, Depends(get_db)],
):
    result = await session.execute(select(Order))
    orders = result.scalars().all()
    return {
        "tenant": tenant.identifier,
        "orders": [{"id": o.id, "description": o.description} for o in orders],
    }
