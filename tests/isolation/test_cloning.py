"""Tenant clones against the real servers: the same rows, sequences that continue, two tenants
that never share a write, a source that keeps serving, and a failed clone that leaves nothing."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_tenancy import (
    ProvisioningError,
    TenancyConfig,
    TenancyManager,
    TenantAlreadyExistsError,
    TenantInactiveError,
    TenantNotFoundError,
    TenantStatus,
)
from fastapi_tenancy.doctor import run_checks
from fastapi_tenancy.events import LifecycleEvent, TenantEvent
from fastapi_tenancy.isolation.copying import copy_tenant_data

from .conftest import Roles
from .databases import databases, dropped_afterwards, server_sql


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)  # SERIAL / AUTO_INCREMENT
    name: Mapped[str] = mapped_column(sa.String(100))


class Invoice(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("customers.id"))
    amount: Mapped[int]


class SharedBase(DeclarativeBase):
    pass


class SharedCustomer(SharedBase):
    """Row-level security and hybrid tiers: the tenant column leads every key."""

    __tablename__ = "customers"
    tenant_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, server_default=sa.FetchedValue())
    id: Mapped[int] = mapped_column(sa.Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))


class SharedInvoice(SharedBase):
    __tablename__ = "invoices"
    __table_args__ = (
        sa.ForeignKeyConstraint(["tenant_id", "customer_id"], ["customers.tenant_id", "customers.id"]),
    )
    tenant_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, server_default=sa.FetchedValue())
    id: Mapped[int] = mapped_column(sa.Identity(), primary_key=True)
    customer_id: Mapped[int]
    amount: Mapped[int]


# (strategy, tier of the tenants in hybrid isolation)
SETUPS = {
    "sqlite": ("schema", None),  # a file per tenant
    "schema": ("schema", None),
    "postgres-database": ("database", None),
    "mysql-database": ("database", None),
    "rls": ("rls", None),
    "hybrid-schema": ("hybrid", "schema"),
    "hybrid-rls": ("hybrid", "rls"),
    "hybrid-database": ("hybrid", "database"),
}


class Clones:
    """A manager with tenants alpha and beta (overlapping keys), for one setup."""

    def __init__(self, manager: TenancyManager, tier: str | None, admin_url: str, prefix: str) -> None:
        self.manager, self.tier, self.admin_url, self.prefix = manager, tier, admin_url, prefix
        shared = self.shared = manager.config.isolation_strategy in ("rls", "hybrid")
        self.customer: Any = SharedCustomer if shared else Customer
        self.invoice: Any = SharedInvoice if shared else Invoice
        self.metadata = SharedBase.metadata if shared else Base.metadata

    async def seed(self, identifier: str, customers: list[str]) -> None:
        await self.manager.register_tenant(
            identifier, identifier.title(), app_metadata=self.metadata, tier=self.tier
        )
        async with self.manager.session(identifier) as session:
            for number, name in enumerate(customers):
                customer = self.customer(name=name)
                session.add(customer)
                await session.flush()  # the id from the sequence
                session.add(self.invoice(customer_id=customer.id, amount=100 * (number + 1)))
            await session.commit()

    async def rows(self, identifier: str) -> dict[str, list[tuple[Any, ...]]]:
        async with self.manager.session(identifier) as session:
            customers = await session.execute(sa.select(self.customer.id, self.customer.name).order_by("id"))
            invoices = await session.execute(
                sa.select(self.invoice.id, self.invoice.customer_id, self.invoice.amount).order_by("id")
            )
            return {"customers": [tuple(r) for r in customers], "invoices": [tuple(r) for r in invoices]}

    async def add_customer(self, identifier: str, name: str) -> int:
        async with self.manager.session(identifier) as session:
            customer = self.customer(name=name)
            session.add(customer)
            await session.commit()
            return int(customer.id)

    async def storage_left(self, identifier: str, tenant_id: str) -> list[str]:
        """What is left anywhere of a tenant that should not exist."""
        name = self.prefix + identifier
        url = make_url(self.admin_url)
        if url.get_backend_name() == "sqlite":
            return [path.name for path in Path(url.database or "").parent.glob(f"*{name}*")]
        left = [str(found) for found in await databases(self.admin_url, name)]
        if make_url(self.admin_url).get_backend_name() != "postgresql":
            return left
        schemas = f"SELECT nspname FROM pg_namespace WHERE nspname LIKE '{name}%'"  # noqa: S608
        left += [str(found) for found in await server_sql(self.admin_url, schemas)]
        if self.shared and self.tier in (None, "rls"):  # as a superuser, past the policies
            for table in ("customers", "invoices"):
                count = f"SELECT count(*) FROM public.{table} WHERE tenant_id = '{tenant_id}'"  # noqa: S608
                if (found := await server_sql(self.admin_url, count)) != [0]:
                    left.append(f"{found} rows in {table}")
        return left


@pytest.fixture(params=list(SETUPS))
def setup(request: pytest.FixtureRequest) -> tuple[str, str, str, dict[str, Any]]:
    """(setup name, application URL, superuser URL, settings); sync, to ask for async fixtures."""
    strategy, tier = SETUPS[request.param]
    settings: dict[str, Any] = {"isolation_strategy": strategy, "database_pool_size": 3}
    if strategy not in ("rls", "hybrid"):
        url = str(
            request.getfixturevalue("mysql_url" if request.param.startswith("mysql") else "postgres_url")
        )
        return request.param, url, url, settings
    roles: Roles = request.getfixturevalue("roles")
    settings["database_owner_url"] = roles.owner_url
    if tier is not None:
        settings["hybrid_default_tier"] = tier
    return request.param, roles.app_url, roles.admin_url, settings


@asynccontextmanager
async def _no_databases() -> AsyncIterator[str]:
    yield "t" + uuid.uuid4().hex[:8] + "_"


@pytest.fixture
async def clones(setup: tuple[str, str, str, dict[str, Any]]) -> AsyncIterator[Clones]:
    name, url, admin_url, settings = setup
    tier = SETUPS[name][1]
    if tier == "database":  # the owner role creates the database tier's databases
        owner = make_url(settings["database_owner_url"]).username
        await server_sql(admin_url, f'ALTER ROLE "{owner}" CREATEDB')
    sqlite = make_url(url).get_backend_name() == "sqlite"
    async with dropped_afterwards(admin_url) if not sqlite else _no_databases() as prefix:
        manager = TenancyManager(TenancyConfig(database_url=url, schema_prefix=prefix, **settings))
        await manager.initialize()
        try:
            clones = Clones(manager, tier, admin_url, prefix)
            await clones.seed("alpha", ["ada", "bob", "cy"])
            await clones.seed("beta", ["dee", "eve"])  # the same ids as alpha's first two
            yield clones
        finally:
            await manager.close()


async def test_a_clone_has_the_rows_its_own_sequences_and_its_own_writes(clones: Clones) -> None:
    manager = clones.manager
    seen: list[TenantEvent] = []
    manager.events.add(seen.append, LifecycleEvent.CLONED, LifecycleEvent.REGISTERED)
    alpha_before, beta_before = await clones.rows("alpha"), await clones.rows("beta")

    started = time.perf_counter()
    gamma = await manager.clone_tenant("alpha", "gamma", app_metadata=clones.metadata)
    elapsed = time.perf_counter() - started

    assert gamma.status is TenantStatus.ACTIVE and gamma.name == "Alpha"
    assert gamma.tier == (await manager.get_tenant("alpha")).tier
    assert await clones.rows("gamma") == alpha_before  # the same keys, the same rows
    assert await clones.rows("alpha") == alpha_before and await clones.rows("beta") == beta_before
    events = [(e.event, e.tenant.identifier, dict(e.details)) for e in seen]
    assert events[0] == (LifecycleEvent.REGISTERED, "gamma", {"cloned_from": "alpha"})
    assert events[-1][:2] == (LifecycleEvent.CLONED, "gamma")
    assert events[-1][2]["source"] == "alpha" and events[-1][2]["rows"] == 6
    print(f"\n{manager.config.isolation_strategy}/{clones.tier}: 6 rows cloned in {elapsed * 1000:.0f} ms")

    # The sequences continue: the next id follows the source's, in each tenant its own.
    copied = {row[0] for row in alpha_before["customers"]}
    new_in_gamma = await clones.add_customer("gamma", "gus")
    new_in_alpha = await clones.add_customer("alpha", "al")
    assert new_in_gamma not in copied and new_in_alpha not in copied
    if not clones.shared or clones.tier in ("schema", "database"):  # sequences of their own
        assert new_in_gamma == new_in_alpha == max(copied) + 1

    # Writes to one never reach the other, either way.
    async with manager.session("gamma") as session:
        await session.execute(
            sa.update(clones.customer).where(clones.customer.id == 1).values(name="renamed")
        )
        await session.commit()
    async with manager.session("alpha") as session:
        await session.execute(sa.delete(clones.invoice).where(clones.invoice.id == 3))
        await session.commit()
    alpha, gamma_rows = await clones.rows("alpha"), await clones.rows("gamma")
    assert alpha["customers"][0] == (1, "ada") and gamma_rows["customers"][0] == (1, "renamed")
    assert 3 in {r[0] for r in gamma_rows["invoices"]} and 3 not in {r[0] for r in alpha["invoices"]}
    assert await clones.rows("beta") == beta_before

    # The clone's storage is its own incarnation: doctor finds nothing wrong.
    failed = [r for r in await run_checks(manager) if r.status == "fail"]
    assert failed == [], failed


async def test_the_source_keeps_serving_and_its_open_writes_are_not_copied(clones: Clones) -> None:
    manager = clones.manager
    async with manager.session("alpha") as writer:
        writer.add(clones.customer(name="uncommitted"))
        await writer.flush()  # holds its row locks, and the source's marker, while the clone runs
        await asyncio.wait_for(manager.clone_tenant("alpha", "gamma", app_metadata=clones.metadata), 30)
        await writer.commit()
    names = [row[1] for row in (await clones.rows("gamma"))["customers"]]
    assert names == ["ada", "bob", "cy"]
    assert "uncommitted" in [row[1] for row in (await clones.rows("alpha"))["customers"]]


async def test_a_failed_clone_leaves_nothing_and_the_refusals_are_clear(
    clones: Clones, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = clones.manager
    made: list[str] = []

    async def copy_then_fail(*args: Any, **kwargs: Any) -> int:
        made.append(args[2].id)
        await copy_tenant_data(*args, **kwargs)  # every row is in (and committed) when it fails
        raise RuntimeError("the disk is full")

    monkeypatch.setattr("fastapi_tenancy.cloning.copy_tenant_data", copy_then_fail)
    with pytest.raises(ProvisioningError, match="could not clone tenant 'alpha': the disk is full"):
        await manager.clone_tenant("alpha", "gamma", app_metadata=clones.metadata)
    with pytest.raises(TenantNotFoundError):
        await manager.get_tenant("gamma")
    assert await clones.storage_left("gamma", made[0]) == []
    monkeypatch.undo()
    # The identifier is free again.
    assert (
        await manager.clone_tenant("alpha", "gamma", app_metadata=clones.metadata)
    ).status.value == "active"

    beta_before = await clones.rows("beta")
    with pytest.raises(TenantAlreadyExistsError):
        await manager.clone_tenant("alpha", "beta", app_metadata=clones.metadata)
    assert await clones.rows("beta") == beta_before  # the existing tenant is untouched
    with pytest.raises(TenantNotFoundError, match="nobody"):
        await manager.clone_tenant("nobody", "delta", app_metadata=clones.metadata)
    await manager.delete_tenant("beta")  # soft: data kept, not to be copied
    with pytest.raises(TenantInactiveError):
        await manager.clone_tenant("beta", "delta", app_metadata=clones.metadata)
    with pytest.raises(TenantNotFoundError):
        await manager.get_tenant("delta")
