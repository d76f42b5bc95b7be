"""A small tenant-aware app used by the tests: the Quick Start's orders, plus routes that
exercise commit-then-read, `session.begin()` and raw SQL."""

from collections.abc import Sequence
from pathlib import Path as FilePath
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_tenancy import TenancyManager, TenancyMiddleware, Tenant
from fastapi_tenancy.dependencies import get_current_tenant, make_tenant_db_dependency


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    description: Mapped[str] = mapped_column(sa.String(200))


# Ids fit the INTEGER column: an unbounded int would reach the database and fail there (a 500).
OrderId = Annotated[int, Path(ge=-(2**31), lt=2**31)]
NewOrderId = Annotated[int, Query(ge=-(2**31), lt=2**31)]


def _rows(orders: Any) -> list[dict[str, Any]]:
    return [{"id": o.id, "description": o.description} for o in orders]


def build_app(
    manager: TenancyManager,
    model: "type[Order] | type[SharedOrder] | None" = None,
    *,
    excluded_paths: Sequence[str] = ("/health",),
) -> FastAPI:
    """The app; `model` is the orders class (`SharedOrder` for row-level security and hybrid)."""
    Row: Any = Order if model is None else model  # noqa: N806
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=excluded_paths)
    get_db = make_tenant_db_dependency(manager)
    Session = Annotated[AsyncSession, Depends(get_db)]
    CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/orders")
    async def list_orders(tenant: CurrentTenant, session: Session) -> dict[str, Any]:
        orders = (await session.execute(sa.select(Row).order_by(Row.id))).scalars().all()
        return {"tenant": tenant.identifier, "orders": _rows(orders)}

    @app.get("/orders/{order_id}")
    async def get_order(order_id: OrderId, session: Session) -> dict[str, Any]:
        order = (await session.execute(sa.select(Row).where(Row.id == order_id))).scalar_one_or_none()
        if order is None:
            raise HTTPException(404, "Order not found")
        return _rows([order])[0]

    @app.post("/orders")
    async def create_order(order_id: NewOrderId, description: str, session: Session) -> dict[str, Any]:
        session.add(Row(id=order_id, description=description))
        await session.commit()
        return {"id": order_id}

    @app.put("/orders/{order_id}")
    async def update_order(order_id: OrderId, description: str, session: Session) -> dict[str, int]:
        result = await session.execute(
            sa.update(Row).where(Row.id == order_id).values(description=description)
        )
        await session.commit()
        return {"updated": int(result.rowcount)}  # type: ignore[attr-defined]

    @app.post("/orders/commit-then-read")
    async def commit_then_read(order_id: NewOrderId, description: str, session: Session) -> dict[str, Any]:
        session.add(Row(id=order_id, description=description))
        await session.commit()
        orders = (await session.execute(sa.select(Row).order_by(Row.id))).scalars().all()
        return {"orders": _rows(orders)}

    @app.post("/orders/begin")
    async def with_begin(order_id: NewOrderId, description: str, session: Session) -> dict[str, Any]:
        async with session.begin():
            session.add(Row(id=order_id, description=description))
        async with session.begin():
            orders = (await session.execute(sa.select(Row).order_by(Row.id))).scalars().all()
            return {"orders": _rows(orders)}

    @app.get("/raw")
    async def raw_sql(session: Session, table: str = "orders") -> dict[str, Any]:
        # Raw SQL naming a table without a schema; `table` is chosen by the test only.
        rows = (await session.execute(sa.text(f"SELECT id, description FROM {table} ORDER BY id"))).all()  # noqa: S608
        return {"orders": [{"id": r[0], "description": r[1]} for r in rows]}

    @app.post("/sql")
    async def route_sql(session: Session, statements: Annotated[list[str], Body()]) -> dict[str, Any]:
        # Misbehaving route code: whatever SQL the test sends, then the session's commit.
        results: list[Any] = []
        for statement in statements:
            result = await session.execute(sa.text(statement))
            results.append([list(row) for row in result] if result.returns_rows else None)  # type: ignore[attr-defined]
        await session.commit()
        return {"results": results}

    return app


class SharedBase(DeclarativeBase):
    pass


class SharedOrder(SharedBase):
    """The orders of `Order`, labelled with their tenant: for row-level security and hybrid tiers.

    The tenant column leads the primary key, so two tenants can both have order 1; the
    server fills it (FetchedValue: the default row-level security sets on the column).
    """

    __tablename__ = "orders"
    tenant_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, server_default=sa.FetchedValue())
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    description: Mapped[str] = mapped_column(sa.String(200))


async def descriptions(manager: TenancyManager) -> list[str]:
    """The current tenant's order descriptions, read through `manager.session()`."""
    async with manager.session() as session:
        return list((await session.execute(sa.select(Order.description).order_by(Order.id))).scalars())


QUICKSTART = FilePath(__file__).resolve().parents[1] / "examples" / "quickstart" / "main.py"
QUICKSTART_URL = "postgresql+asyncpg://postgres:postgres@localhost/myapp"
"""The database URL the Quick Start's main.py names: a server and database tests never reach."""


def quickstart_as_written(*config_lines: str) -> str:
    """The Quick Start's main.py as its page writes it: the database URL a literal in the code.

    examples/quickstart/main.py reads the URL from the environment (its one change, for
    tests/test_quickstart.py); this undoes that change. `config_lines` are more
    `TenancyConfig` arguments, as a user would add them (`'schema_template="orders_template",'`).
    """
    source = QUICKSTART.read_text()
    changed = (
        '    database_url=os.environ["TENANCY_DATABASE_URL"],'
        "  # the only change: the URL comes from the environment\n"
    )
    assert source.startswith("import os\n") and changed in source, "examples/quickstart/main.py changed"
    extra = "".join(f"    {line}\n" for line in config_lines)
    return source.removeprefix("import os\n").replace(
        changed, f'    database_url="{QUICKSTART_URL}",\n' + extra
    )
