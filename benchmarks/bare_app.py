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
- `BENCH_BARE_SESSION`: how `GET /orders` holds its session: `dependency` (the default, a
  yield dependency, which FastAPI ends after the response is sent) or `route` (`async with
  SessionLocal()` inside the route, closed when the route returns).

Switching tenant per request (`saturation.py`): `{tenant}` in `BENCH_BARE_SCHEMA` or in
`BENCH_BARE_DATABASE_URL` is replaced by the request's `X-Tenant-ID` with `_` for `-`
(the library's storage names), so the app serves every tenant's rows as the tenancy app
does: on PostgreSQL one engine, the schema chosen per statement (`schema_translate_map`),
on SQLite an engine per tenant file, opened at its first request and kept.
"""

import os
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
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
SESSION = os.environ.get("BENCH_BARE_SESSION", "dependency")
if SESSION not in ("dependency", "route"):
    sys.exit("BENCH_BARE_SESSION: dependency or route")
PER_TENANT = "{tenant}"
SCHEMA_PER_TENANT = SCHEMA is not None and PER_TENANT in SCHEMA
DATABASE_PER_TENANT = PER_TENANT in DATABASE_URL


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    __table_args__: dict[str, Any] = {"schema": SCHEMA} if SCHEMA and not SCHEMA_PER_TENANT else {}
    if TENANT_COLUMN:
        # The shared table's shape (benchmarks/tenancy_app.py): the tenant column leads the key.
        tenant_id: Mapped[str] = mapped_column(sa.String(36), name=TENANT_COLUMN, primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False if TENANT_COLUMN else "auto")
    description: Mapped[str] = mapped_column(sa.String(200) if TENANT_COLUMN else sa.String())


def _sessionmaker(url: str) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(create_async_engine(url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW))


SessionLocal = None if DATABASE_PER_TENANT else _sessionmaker(DATABASE_URL)
# The one engine (none with a database per tenant): what the in-process benchmarks dispose.
engine = None if SessionLocal is None else SessionLocal.kw["bind"]
_tenant_sessionmakers: dict[str, async_sessionmaker[AsyncSession]] = {}
_tenant_options: dict[str, dict[str, Any]] = {}
NO_OPTIONS: dict[str, Any] = {}

app = FastAPI(title="bare")


def tenant_of(request: Request) -> str:
    """The tenant whose rows the request reads: its `X-Tenant-ID` when storage is per tenant."""
    if SCHEMA_PER_TENANT or DATABASE_PER_TENANT:
        return request.headers.get("x-tenant-id", TENANT)
    return TENANT


def sessionmaker_of(tenant: str) -> async_sessionmaker[AsyncSession]:
    """The tenant's sessions: one engine for all, or (a database URL per tenant) its own."""
    if SessionLocal is not None:
        return SessionLocal
    maker = _tenant_sessionmakers.get(tenant)
    if maker is None:
        url = DATABASE_URL.replace(PER_TENANT, tenant.replace("-", "_"))
        maker = _tenant_sessionmakers[tenant] = _sessionmaker(url)
    return maker


def options_of(tenant: str) -> dict[str, Any]:
    """Execution options of the tenant's statement: its schema, with a schema per tenant."""
    if not SCHEMA_PER_TENANT:
        return NO_OPTIONS
    options = _tenant_options.get(tenant)
    if options is None:
        assert SCHEMA is not None
        schema = SCHEMA.replace(PER_TENANT, tenant.replace("-", "_"))
        options = _tenant_options[tenant] = {"schema_translate_map": {None: schema}}
    return options


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    async with sessionmaker_of(tenant_of(request))() as session:
        yield session


# The routes carry no return annotation, like the Quick Start's: an annotation would
# make FastAPI serialise through a response model instead of `jsonable_encoder`, a
# different (and differently priced) path than the app we compare with.
@app.get("/health")
async def health():  # type: ignore[no-untyped-def]
    return {"status": "ok"}


def _query() -> Any:
    query = select(Order)
    if TENANT_ID:
        query = query.where(Order.tenant_id == TENANT_ID)
    return query


if SESSION == "dependency":

    @app.get("/orders")
    async def list_orders(  # type: ignore[no-untyped-def]
        request: Request, session: Annotated[AsyncSession, Depends(get_db)]
    ):
        tenant = tenant_of(request)
        result = await session.execute(_query(), execution_options=options_of(tenant))
        orders = result.scalars().all()
        return {
            "tenant": tenant,
            "orders": [{"id": o.id, "description": o.description} for o in orders],
        }

else:

    @app.get("/orders")
    async def list_orders_in_route(request: Request):  # type: ignore[no-untyped-def]
        tenant = tenant_of(request)
        # The connection goes back to the pool when the block ends, before the response
        # is even built: what `Depends(get_db, scope="function")` would do.
        async with sessionmaker_of(tenant)() as session:
            result = await session.execute(_query(), execution_options=options_of(tenant))
            orders = result.scalars().all()
        return {
            "tenant": tenant,
            "orders": [{"id": o.id, "description": o.description} for o in orders],
        }
