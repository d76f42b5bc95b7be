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
"""

import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DATABASE_URL = os.environ["BENCH_BARE_DATABASE_URL"]
SCHEMA = os.environ.get("BENCH_BARE_SCHEMA", "") or None
TENANT = os.environ.get("BENCH_BARE_TENANT", "acme-corp")
POOL_SIZE = int(os.environ.get("BENCH_BARE_POOL_SIZE", "10"))
MAX_OVERFLOW = int(os.environ.get("BENCH_BARE_MAX_OVERFLOW", "10"))


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    __table_args__: dict[str, Any] = {"schema": SCHEMA} if SCHEMA else {}
    id: Mapped[int] = mapped_column(primary_key=True)
    description: Mapped[str] = mapped_column()


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
    result = await session.execute(select(Order))
    orders = result.scalars().all()
    return {
        "tenant": TENANT,
        "orders": [{"id": o.id, "description": o.description} for o in orders],
    }
