"""Compiled-cache alternation (checklist item 12): the same statement shapes, including
relationship loads (lazy, `selectinload`, `joinedload`), `with_loader_criteria`, Core
selects of a `Table` and raw SQL, run for tenant A, then B, then A... hundreds of times on
one pooled connection. SQLAlchemy caches each compiled shape once for every tenant; every
result must still come from the tenant that asked. Also two sessions of different tenants
open at once, loading the same primary keys (item 11)."""

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    with_loader_criteria,
)

from fastapi_tenancy import TenancyConfig, TenancyManager, Tenant

ROUNDS = 50


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(50))
    invoices: Mapped[list["Invoice"]] = relationship(back_populates="customer", order_by="Invoice.id")


class Invoice(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("customers.id"))
    description: Mapped[str] = mapped_column(sa.String(50))
    customer: Mapped[Customer] = relationship(back_populates="invoices")


# The same ids in both tenants; every value names its tenant.
def _rows(tenant: str) -> list[Base]:
    return [
        Customer(id=1, name=f"{tenant}-customer-1"),
        Customer(id=2, name=f"{tenant}-customer-2"),
        Invoice(id=1, customer_id=1, description=f"{tenant}-invoice-1"),
        Invoice(id=2, customer_id=1, description=f"{tenant}-invoice-2"),
        Invoice(id=3, customer_id=2, description=f"{tenant}-invoice-3"),
    ]


async def _shapes(manager: TenancyManager, tenant: Tenant) -> list[str]:
    """Every statement shape once, as `tenant`: the values they returned."""
    seen: list[str] = []
    async with manager.session(tenant) as session:
        customer = await session.get(Customer, 1)
        assert customer is not None
        seen.append(customer.name)
        seen += [i.description for i in await customer.awaitable_attrs.invoices]  # lazy load
        invoice = (await session.execute(sa.select(Invoice).where(Invoice.id == 3))).scalar_one()
        seen.append((await invoice.awaitable_attrs.customer).name)  # many-to-one lazy load
    async with manager.session(tenant) as session:
        for option in (selectinload(Customer.invoices), joinedload(Customer.invoices)):
            query = (
                sa.select(Customer)
                .options(option)
                .order_by(Customer.id)
                .execution_options(populate_existing=True)
            )
            for c in (await session.execute(query)).unique().scalars():
                seen += [c.name, *(i.description for i in c.invoices)]
        criteria = (
            sa.select(Customer)
            .options(
                selectinload(Customer.invoices),
                with_loader_criteria(Invoice, Invoice.description.like("%-invoice-2")),
            )
            .execution_options(populate_existing=True)
        )
        for c in (await session.execute(criteria)).scalars():
            seen += [c.name, *(i.description for i in c.invoices)]
        table = Invoice.__table__
        seen += (await session.execute(sa.select(table.c.description).order_by(table.c.id))).scalars().all()
        seen += (await session.execute(sa.text("SELECT name FROM customers ORDER BY id"))).scalars().all()
    return seen


@pytest.fixture(params=["postgres_url", "sqlite_url"], ids=["schema-postgres", "file-sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


async def test_alternating_tenants_through_every_statement_shape(url: str) -> None:
    manager = TenancyManager(TenancyConfig(database_url=url, database_pool_size=1, database_max_overflow=1))
    await manager.initialize()
    try:
        tenants = {}
        for slug in ("alpha", "beta"):
            tenants[slug] = await manager.register_tenant(slug, slug, app_metadata=Base.metadata)
            async with manager.session(tenants[slug]) as session:
                session.add_all(_rows(slug)[:2])
                await session.flush()
                session.add_all(_rows(slug)[2:])
                await session.commit()
        expected = {slug: await _shapes(manager, tenant) for slug, tenant in tenants.items()}
        for slug, values in expected.items():
            assert len(values) == 22 and all(v.startswith(f"{slug}-") for v in values), values
        for _ in range(ROUNDS):
            for slug in ("alpha", "beta"):
                assert await _shapes(manager, tenants[slug]) == expected[slug]

        # Two tenants' sessions open at once, the same primary keys loaded in each.
        async with manager.session(tenants["alpha"]) as a, manager.session(tenants["beta"]) as b:
            for _ in range(3):
                first, second = await a.get(Customer, 1), await b.get(Customer, 1)
                assert first is not None and second is not None and first is not second
                assert (first.name, second.name) == ("alpha-customer-1", "beta-customer-1")
                await a.commit()
                await b.commit()
                await a.refresh(first)  # a refresh after commit reads the right schema
                assert first.name == "alpha-customer-1"
    finally:
        await manager.close()
