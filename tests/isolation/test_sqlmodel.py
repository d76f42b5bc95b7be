"""The isolation matrix with SQLModel sessions: `make_tenant_db_dependency(session_class=...)`
yields SQLModel's `AsyncSession` (`session.exec()`), scoped exactly like ours.

Two tenants with overlapping primary keys on a pool of one connection: PostgreSQL schemas, a
database per tenant, shared tables under row-level security, hybrid tiers, and SQLite files.
Owners and their items (a relationship), read with `exec()`, `get()`, `selectinload`, and
sync ORM code through `run_sync()`.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, cast

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlalchemy.orm import registry, selectinload
from sqlmodel import Field, Relationship, Session, SQLModel, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from fastapi_tenancy import ConfigurationError, TenancyConfig, TenancyManager, TenancyMiddleware
from fastapi_tenancy.dependencies import CurrentTenant, make_tenant_db_dependency

from .databases import dropped_afterwards
from .test_matrix import _setup

# Two tenants, overlapping ids: item 1 and owner 1 exist in both.
ROWS = {"alpha": {1: "alpha-1", 2: "alpha-2"}, "beta": {1: "beta-1", 3: "beta-3"}}


class OwnBase(SQLModel, registry=registry()):
    """Tables of tenants with storage of their own (a registry of their own: not SQLModel.metadata)."""


class Owner(OwnBase, table=True):
    __tablename__ = "owners"
    id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    email: str = Field(max_length=200)
    items: list["Item"] = Relationship(back_populates="owner")


class Item(OwnBase, table=True):
    __tablename__ = "items"
    id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    title: str = Field(max_length=200)
    owner_id: int = Field(foreign_key="owners.id")
    owner: Owner = Relationship(back_populates="items")


class SharedBase(SQLModel, registry=registry()):
    """The same tables for shared tables (row-level security, hybrid): the tenant column leads each key."""


class SharedOwner(SharedBase, table=True):
    __tablename__ = "owners"
    tenant_id: str | None = Field(
        default=None, primary_key=True, max_length=36, sa_column_kwargs={"server_default": sa.FetchedValue()}
    )
    id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    email: str = Field(max_length=200)
    items: list["SharedItem"] = Relationship(back_populates="owner")


class SharedItem(SharedBase, table=True):
    __tablename__ = "items"
    __table_args__ = (sa.ForeignKeyConstraint(["tenant_id", "owner_id"], ["owners.tenant_id", "owners.id"]),)
    tenant_id: str | None = Field(
        default=None, primary_key=True, max_length=36, sa_column_kwargs={"server_default": sa.FetchedValue()}
    )
    id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    title: str = Field(max_length=200)
    owner_id: int
    owner: SharedOwner = Relationship(back_populates="items")


SETUPS = ["postgres", "postgres-database", "rls", "hybrid", "sqlite"]
SHARED = ("rls", "hybrid")


def build_app(manager: TenancyManager, owner: Any, item: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)
    get_db = make_tenant_db_dependency(manager, session_class=AsyncSession)
    DB = Annotated[AsyncSession, Depends(get_db)]

    def rows(items: Any) -> list[dict[str, Any]]:
        return [{"id": i.id, "title": i.title, "owner": i.owner.email} for i in items]

    @app.get("/items")
    async def list_items(session: DB) -> list[dict[str, Any]]:
        statement = select(item).options(selectinload(item.owner)).order_by(item.id)
        return rows((await session.exec(statement)).all())

    @app.get("/items/{item_id}")
    async def read_item(item_id: int, session: DB) -> dict[str, Any]:
        found = (await session.exec(select(item).where(item.id == item_id))).first()
        if found is None:
            raise HTTPException(404, "Item not found")
        await session.refresh(found, ["owner"])
        return rows([found])[0]

    @app.get("/owners/{owner_id}/items")
    async def owner_items(owner_id: int, tenant: CurrentTenant, session: DB) -> list[str]:
        key = owner_id if owner is Owner else (tenant.id, owner_id)  # shared tables: the tenant leads the key
        found = await session.get(owner, key, options=[selectinload(owner.items)])
        if found is None:
            raise HTTPException(404, "Owner not found")
        return sorted(i.title for i in found.items)

    @app.post("/items")
    async def create_item(item_id: int, title: str, owner_id: int, session: DB) -> list[dict[str, Any]]:
        new = owner(id=owner_id, email=f"{title}@example.com")
        session.add(item(id=item_id, title=title, owner=new))
        await session.commit()
        return await list_items(session)  # the commit, then a read in the same session

    @app.put("/items/{item_id}")
    async def rename_item(item_id: int, title: str, session: DB) -> dict[str, int]:
        result = await session.exec(update(item).where(item.id == item_id).values(title=title))
        await session.commit()
        return {"updated": result.rowcount}

    @app.get("/sync/titles")
    async def sync_titles(session: DB) -> list[str]:
        def titles(sync: sa.orm.Session) -> list[str]:  # sync ORM code, on the session's sync side
            # SQLModel's sync side is a `sqlmodel.Session` too (and ours): exec() is there.
            return [i.title for i in cast(Session, sync).exec(select(item).order_by(item.id))]

        return await session.run_sync(titles)

    return app


@dataclass
class Env:
    manager: TenancyManager
    client: httpx.AsyncClient
    shared: bool

    async def get(self, tenant: str, path: str) -> httpx.Response:
        return await self.client.get(path, headers={"X-Tenant-ID": tenant})


@asynccontextmanager
async def two_tenants(url: str, shared: bool, **settings: Any) -> AsyncIterator[Env]:
    config = TenancyConfig(database_url=url, database_pool_size=1, database_max_overflow=0, **settings)
    manager = TenancyManager(config)
    await manager.initialize()
    owner: Any = SharedOwner if shared else Owner
    item: Any = SharedItem if shared else Item
    base: Any = SharedBase if shared else OwnBase
    tiers = iter(("schema", "rls") if config.isolation_strategy == "hybrid" else (None, None))
    try:
        for slug, rows in ROWS.items():
            tenant = await manager.register_tenant(slug, slug, app_metadata=base.metadata, tier=next(tiers))
            async with manager.session(tenant, session_class=AsyncSession) as session:
                assert type(session) is AsyncSession
                for key, title in rows.items():
                    session.add(item(id=key, title=title, owner=owner(id=key, email=f"{title}@example.com")))
                await session.commit()
        transport = httpx.ASGITransport(app=build_app(manager, owner, item))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Env(manager, client, shared)
    finally:
        await manager.close()


@pytest.fixture(params=SETUPS)
def setup(request: pytest.FixtureRequest) -> tuple[str, str, dict[str, Any]]:
    url, settings = _setup(request, request.param)
    return request.param, url, settings


@pytest.fixture
async def env(setup: tuple[str, str, dict[str, Any]]) -> AsyncIterator[Env]:
    name, url, settings = setup
    if name.endswith("-database"):
        async with (
            dropped_afterwards(url) as prefix,
            two_tenants(url, False, schema_prefix=prefix, **settings) as e,
        ):
            yield e
        return
    async with two_tenants(url, name in SHARED, **settings) as environment:
        yield environment


def titles(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [row["title"] for row in response.json()]


async def test_exec_reads_only_the_tenants_rows(env: Env) -> None:
    for _ in range(20):
        assert (await env.get("alpha", "/items")).json() == [
            {"id": 1, "title": "alpha-1", "owner": "alpha-1@example.com"},
            {"id": 2, "title": "alpha-2", "owner": "alpha-2@example.com"},
        ]
        assert titles(await env.get("beta", "/items")) == ["beta-1", "beta-3"]


async def test_an_id_of_the_other_tenant_looks_like_no_id_at_all(env: Env) -> None:
    assert (await env.get("alpha", "/items/1")).json()["owner"] == "alpha-1@example.com"
    assert (await env.get("beta", "/items/1")).json()["owner"] == "beta-1@example.com"
    foreign, nowhere = await env.get("alpha", "/items/3"), await env.get("alpha", "/items/999")
    assert foreign.status_code == nowhere.status_code == 404
    assert foreign.content == nowhere.content
    assert (await env.get("beta", "/owners/1/items")).json() == ["beta-1"]
    assert (await env.get("alpha", "/owners/3/items")).status_code == 404


async def test_writes_never_reach_the_other_tenant(env: Env) -> None:
    renamed = await env.client.put("/items/3", params={"title": "x"}, headers={"X-Tenant-ID": "alpha"})
    assert renamed.json() == {"updated": 0}
    renamed = await env.client.put("/items/1", params={"title": "renamed"}, headers={"X-Tenant-ID": "beta"})
    assert renamed.json() == {"updated": 1}
    params: dict[str, str | int] = {"item_id": 3, "title": "alpha-3", "owner_id": 3}
    created = await env.client.post("/items", params=params, headers={"X-Tenant-ID": "alpha"})
    assert titles(created) == ["alpha-1", "alpha-2", "alpha-3"]
    assert titles(await env.get("alpha", "/items")) == ["alpha-1", "alpha-2", "alpha-3"]
    assert titles(await env.get("beta", "/items")) == ["renamed", "beta-3"]


async def test_sync_orm_code_in_run_sync_stays_in_the_tenant(env: Env) -> None:
    for _ in range(5):
        assert (await env.get("alpha", "/sync/titles")).json() == ["alpha-1", "alpha-2"]
        assert (await env.get("beta", "/sync/titles")).json() == ["beta-1", "beta-3"]


@pytest.mark.parametrize("setup", ["postgres", "rls"], indirect=True)
async def test_a_session_class_that_builds_its_own_sync_side_is_refused(
    setup: tuple[str, str, dict[str, Any]],
) -> None:
    class Unscoped(SAAsyncSession):
        """Makes its sync side without the class it is given (as SQLModel's did before 0.0.12)."""

        def __init__(self, bind: Any = None, **kwargs: Any) -> None:
            kwargs.pop("sync_session_class", None)
            super().__init__(bind, **kwargs)

    name, url, settings = setup
    async with two_tenants(url, name in SHARED, **settings) as environment:
        with pytest.raises(ConfigurationError, match="Unscoped ignores sync_session_class"):
            async with environment.manager.session("alpha", session_class=Unscoped):
                pass
        get_db = make_tenant_db_dependency(environment.manager, session_class=Unscoped)
        app = FastAPI()
        app.add_middleware(TenancyMiddleware, manager=environment.manager)

        @app.get("/count")
        async def count(session: Annotated[Unscoped, Depends(get_db)]) -> int:
            return len((await session.execute(sa.text("SELECT 1"))).all())

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/count", headers={"X-Tenant-ID": "alpha"})
        assert response.status_code == 500, response.text
