import os
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware, Tenant
from fastapi_tenancy.dependencies import get_current_tenant, make_tenant_db_dependency
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

# Database models
class Base(DeclarativeBase):
    pass

class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    description: Mapped[str] = mapped_column()

# fastapi-tenancy setup
config = TenancyConfig(
    database_url=os.environ["TENANCY_DATABASE_URL"],  # the only change: the URL comes from the environment
    resolution_strategy="header",   # (1)
    isolation_strategy="schema",    # (2)
)
store = SQLAlchemyTenantStore(config.database_url)
manager = TenancyManager(config, store)

# FastAPI app
@asynccontextmanager
async def lifespan(app: FastAPI):
    await manager.initialize()      # (3)
    yield
    await manager.close()

app = FastAPI(title="My SaaS App", lifespan=lifespan)
app.add_middleware(
    TenancyMiddleware,
    manager=manager,
    excluded_paths=["/health"],     # (4)
)

# Dependency
get_db = make_tenant_db_dependency(manager)   # (5)

# Routes
@app.get("/health")
async def health():
    return {"status": "ok"}

@app.get("/orders")
async def list_orders(
    tenant: Annotated[Tenant, Depends(get_current_tenant)],
    session: Annotated[AsyncSession, Depends(get_db)],
):
    result = await session.execute(select(Order))
    orders = result.scalars().all()
    return {
        "tenant": tenant.identifier,
        "orders": [{"id": o.id, "description": o.description} for o in orders],
    }

@app.post("/orders")
async def create_order(
    description: str,
    session: Annotated[AsyncSession, Depends(get_db)],
):
    order = Order(description=description)
    session.add(order)
    await session.commit()
    await session.refresh(order)
    return {"id": order.id, "description": order.description}
