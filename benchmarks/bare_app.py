"""App B of the overhead benchmark: the Quick Start route with no tenancy at all.

Same route (`GET /orders`), same JSON shape, same session-per-request async
generator dependency, same driver. The Order model is bound to one fixed
storage: on PostgreSQL the table `<BENCH_BARE_SCHEMA>.orders` (the schema the
tenancy app provisioned for `acme-corp`), on SQLite the tenant's own database
file. Configured from the environment by `overhead.py`:

- `BENCH_BARE_DATABASE_URL`: the async URL to open.
- `BENCH_BARE_SCHEMA`: the fixed schema of the `orders` table ("" for none, SQLite).
- `BENCH_BARE_TENANT`: the identifier echoed in the response (`acme-corp`).
- `BENCH_BARE_POOL_SIZE` / `BENCH_BARE_MAX_OVERFLOW`: the pool (10 / 10 by default,
  like `TenancyConfig`'s defaults).
- `BENCH_BARE_TENANT_COLUMN`: the model's tenant column, as the tables of row-level
  security and hybrid isolation have it ("" for none, the default).
- `BENCH_BARE_TENANT_ID`: with a tenant column, the value the query filters it by
  (`WHERE tenant_id = ...`, what an app sharing tables does by hand); "" for no filter.
"""

import os
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DATABASE_URL = os.environ["BENCH_BARE_DATABASE_URL"]
SCHEMA = os.environ.get("BENCH_BARE_SCHEMA", "") or None
TENANT = os.environ.get("BENCH_BARE_TENANT", "acme-corp")
POOL_SIZE = int(os.environ.get("BENCH_BARE_POOL_SIZE", "10"))
MAX_OVERFLOW = int(os.environ.get("BENCH_BARE_MAX_OVERFLOW", "10"))
TENANT_COLUMN = os.environ.get("BENCH_BARE_TENANT_COLUMN", "")
TENANT_ID = os.environ.get("BENCH_BARE_TENANT_ID", "")
if TENANT_ID and not TENANT_COLUMN:
    sys.exit("BENCH_BARE_TENANT_ID needs BENCH_BARE_TENANT_COLUMN")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    __table_args__: dict[str, Any] = {"schema": SCHEMA} if SCHEMA else {}
    if TENANT_COLUMN:
        # The shared table's shape (benchmarks/tenancy_app.py): the tenant column leads the key.
        tenant_id: Mapped[str] = mapped_column(sa.String(36), name=TENANT_COLUMN, primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False if TENANT_COLUMN else "auto")
    description: Mapped[str] = mapped_column(sa.String(200) if TENANT_COLUMN else sa.String())


engine = create_async_engine(DATABASE_URL, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
SessionLocal = async_sessionmaker(engine)

app = FastAPI(title="bare")


async def get_db() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        yield session


# The routes carry no return annotation, like the Quick Start's: an annotation would
# make FastAPI serialise through a response model instead of `jsonable_encoder`, a
# different (and differently priced) path than the app we compare with.
@app.get("/health")
async def health():  # type: ignore[no-untyped-def]
    return {"status": "ok"}


@app.get("/orders")
async def list_orders(session: Annotated[AsyncSession, Depends(get_db)]):  # type: ignore[no-untyped-def]
    query = select(Order)
    if TENANT_ID:
        query = query.where(Order.tenant_id == TENANT_ID)
    result = await session.execute(query)
    orders = result.scalars().all()
    return {
        "tenant": TENANT,
        "orders": [{"id": o.id, "description": o.description} for o in orders],
    }
