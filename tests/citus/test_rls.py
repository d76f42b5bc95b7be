"""Row-level security on a Citus cluster: the shared tables distributed by the tenant column,
the policies holding on every shard as the application role, which statements route to one
node, and `tenants move` isolating a tenant's shard and moving it while it is written to (writes wait
for the copy, none is lost)."""

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from typer.testing import CliRunner

from fastapi_tenancy import ConfigurationError, TenancyConfig, TenancyManager
from fastapi_tenancy.cli import app as cli_app
from fastapi_tenancy.doctor import run_checks
from fastapi_tenancy.isolation.citus import REFERENCE_TABLE
from fastapi_tenancy.isolation.rls import RLSIsolation

from ..apps import SharedOrder, build_app
from ..isolation.conftest import Roles

ROWS = {"alpha": {1: "alpha-1", 2: "alpha-2"}, "beta": {1: "beta-1", 3: "beta-3"}}


class _Base(DeclarativeBase):
    pass


class Plan(_Base):  # shared by every tenant, a copy on every node
    __tablename__ = "plans"
    __table_args__ = {"schema": "public", "info": {REFERENCE_TABLE: True}}
    id: Mapped[int] = mapped_column(primary_key=True)


class Order(_Base):
    __tablename__ = "orders"
    tenant_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, server_default=sa.FetchedValue())
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    description: Mapped[str] = mapped_column(sa.String(200))
    plan_id: Mapped[int | None] = mapped_column(sa.ForeignKey("public.plans.id"))


class Line(_Base):  # a child of orders: its foreign key pairs the tenant columns
    __tablename__ = "lines"
    __table_args__ = (sa.ForeignKeyConstraint(["tenant_id", "order_id"], ["orders.tenant_id", "orders.id"]),)
    tenant_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, server_default=sa.FetchedValue())
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    order_id: Mapped[int]


async def _admin(url: str) -> asyncpg.Connection:
    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.host, port=parsed.port, user="postgres", database=parsed.database
    )


def _config(roles: Roles, **settings: Any) -> TenancyConfig:
    return TenancyConfig(
        database_url=roles.app_url,
        database_owner_url=roles.owner_url,
        database_cluster="citus",
        **{"isolation_strategy": "rls", **settings},
    )


@pytest.fixture
async def seeded(citus_roles: Roles) -> AsyncIterator[TenancyManager]:
    owner = await asyncpg.connect(str(make_url(citus_roles.owner_url).set(drivername="postgresql")))
    try:
        await owner.execute("CREATE TABLE public.plans (id integer PRIMARY KEY)")
        await owner.execute("INSERT INTO public.plans VALUES (1)")
    finally:
        await owner.close()
    manager = TenancyManager(_config(citus_roles))
    await manager.initialize()
    try:
        for identifier, rows in ROWS.items():
            tenant = await manager.register_tenant(
                identifier, identifier.title(), app_metadata=_Base.metadata
            )
            async with manager.session(tenant) as session:
                session.add_all(Order(id=i, description=d, plan_id=1) for i, d in rows.items())
                await session.flush()  # no relationship tells the ORM that orders go first
                session.add_all(Line(id=10 + i, order_id=i) for i in rows)
                await session.commit()
        yield manager
    finally:
        await manager.close()


async def _plan(manager: TenancyManager, tenant: str, statement: str) -> str:
    async with manager.session(tenant) as session:
        return "\n".join((await session.execute(sa.text(f"EXPLAIN {statement}"))).scalars())


async def test_tenant_tables_are_distributed_colocated_and_flagged_ones_are_reference(
    seeded: TenancyManager, citus_roles: Roles
) -> None:
    conn = await _admin(citus_roles.admin_url)
    try:
        tables = {
            r["table_name"]: (r["citus_table_type"], r["distribution_column"], r["colocation_id"])
            for r in await conn.fetch(
                "SELECT table_name::text, citus_table_type, distribution_column, colocation_id "
                "FROM citus_tables"
            )
        }
        assert tables["orders"][:2] == tables["lines"][:2] == ("distributed", "tenant_id"), tables
        assert tables["orders"][2] == tables["lines"][2]  # one colocation group
        assert tables["plans"][0] == "reference"
        assert "fastapi_tenancy_tenant_fence" not in tables  # the fence stays on the coordinator
        # Every shard of both tables carries the policy, enabled and forced.
        for table in ("orders", "lines"):
            shards = await conn.fetch(
                "SELECT success, result FROM run_command_on_shards($1, $$SELECT relrowsecurity "
                "AND relforcerowsecurity AND (SELECT count(*) = 1 FROM pg_policy WHERE polrelid = c.oid) "
                "FROM pg_class c WHERE c.oid = '%s'::regclass$$)",
                table,
            )
            assert len(shards) == 32 and all(r["success"] and r["result"] == "t" for r in shards), shards
    finally:
        await conn.close()
    checks = {c.name: c for c in await run_checks(seeded)}
    assert checks["citus shared tables"].status == "ok", checks["citus shared tables"]
    assert checks["row-level security"].status == "ok"


async def test_policies_hold_on_every_shard_for_the_application_role(
    seeded: TenancyManager, citus_roles: Roles
) -> None:
    for identifier, rows in ROWS.items():
        other = next(o for o in ROWS if o != identifier)
        other_id = (await seeded.get_tenant(other)).id
        async with seeded.session(identifier) as session:
            # No tenant filter: the query runs on all 32 shards, each policy keeping the rest out.
            found = dict((await session.execute(sa.select(Order.id, Order.description))).all())
            assert found == rows
            lines = set((await session.execute(sa.select(Line.order_id))).scalars())
            assert lines == set(rows)
            # Routed straight to the other tenant's shard: its policy answers nothing.
            stolen = await session.execute(sa.select(Order.id).where(Order.tenant_id == other_id))
            assert stolen.all() == []
            changed = await session.execute(
                sa.update(Order).where(Order.tenant_id == other_id).values(description="stolen")
            )
            assert changed.rowcount == 0  # type: ignore[attr-defined]
            with pytest.raises(sa.exc.DBAPIError, match="row-level security"):
                await session.execute(sa.insert(Order).values(tenant_id=other_id, id=99, description="x"))
    # The application role with no tenant bound (no tenant function): nothing, on any shard.
    app = await asyncpg.connect(str(make_url(citus_roles.app_url).set(drivername="postgresql")))
    try:
        assert await app.fetchval("SELECT count(*) FROM public.orders") == 0
        with pytest.raises(asyncpg.PostgresError, match="row-level security"):
            await app.execute("INSERT INTO public.orders (tenant_id, id, description) VALUES ('x', 1, 'x')")
    finally:
        await app.close()


async def test_statements_with_the_tenant_filter_route_to_one_node(seeded: TenancyManager) -> None:
    isolation = seeded.isolation
    assert isinstance(isolation, RLSIsolation)
    alpha = await seeded.get_tenant("alpha")
    node = (await isolation.shards.placements([alpha.id]))[alpha.id]
    port = node.split(":")[1]
    where = f"tenant_id = '{alpha.id}'"  # a generated id: no quoting needed
    for statement in (
        f"SELECT * FROM orders WHERE {where}",  # noqa: S608
        f"SELECT * FROM orders o JOIN lines l USING (tenant_id) WHERE o.{where} AND l.order_id = o.id",  # noqa: S608
        f"UPDATE orders SET description = 'x' WHERE {where} AND id = 1",  # noqa: S608
        f"DELETE FROM lines WHERE {where} AND id = 11",  # noqa: S608
        "INSERT INTO orders (id, description) VALUES (5, 'x')",  # the default, computed on the coordinator
    ):
        plan = await _plan(seeded, "alpha", statement)
        assert "Task Count: 1" in plan and f"port={port}" in plan, (statement, plan)
    async with seeded.session("alpha") as session:  # a bound parameter routes as a literal does
        explained = await session.execute(
            sa.text("EXPLAIN SELECT * FROM orders WHERE tenant_id = :id"), {"id": alpha.id}
        )
        plan = "\n".join(explained.scalars())
        assert "Task Count: 1" in plan and f"port={port}" in plan, plan
    # The policy alone does not route: Citus prunes shards by constants in the query only.
    for statement in ("SELECT * FROM orders", "UPDATE orders SET description = 'x' WHERE id = 1"):
        plan = await _plan(seeded, "alpha", statement)
        assert "Task Count: 32" in plan, (statement, plan)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        pytest.param(
            sa.Table(
                "items",
                sa.MetaData(),
                sa.Column("tenant_id", sa.String(36), primary_key=True),
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("sku", sa.Text, unique=True),
            ),
            "unique index .* does not include the tenant column",
            id="unique-without-tenant",
        ),
        pytest.param(
            sa.Table(
                "notes",
                sa.MetaData(),
                sa.Column("tenant_id", sa.String(36), primary_key=True),
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("plan_id", sa.Integer, sa.ForeignKey("public.plans.id")),
            ),
            "neither a tenant table nor a reference table",
            id="fk-to-a-local-table",
        ),
    ],
)
async def test_what_citus_cannot_distribute_is_refused_clearly(
    citus_roles: Roles, table: sa.Table, message: str
) -> None:
    sa.Table("plans", table.metadata, sa.Column("id", sa.Integer, primary_key=True), schema="public")
    owner = await asyncpg.connect(str(make_url(citus_roles.owner_url).set(drivername="postgresql")))
    try:
        await owner.execute("CREATE TABLE public.plans (id integer PRIMARY KEY)")  # not flagged: local
    finally:
        await owner.close()
    manager = TenancyManager(_config(citus_roles))
    await manager.initialize()
    try:
        with pytest.raises(ConfigurationError, match=message):
            await manager.register_tenant("alpha", "Alpha", app_metadata=table.metadata)
        assert await manager.store.get_by_identifier("alpha") is None
    finally:
        await manager.close()
    conn = await _admin(citus_roles.admin_url)
    try:  # nothing was created: the refusal rolled the tables back
        assert await conn.fetchval("SELECT to_regclass($1)", f"public.{table.name}") is None
    finally:
        await conn.close()


async def test_a_foreign_key_not_pairing_the_tenant_columns_is_refused(citus_roles: Roles) -> None:
    metadata = sa.MetaData()
    sa.Table(
        "orders",
        metadata,
        sa.Column("tenant_id", sa.String(36), primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True),
    )
    sa.Table(
        "lines",
        metadata,
        sa.Column("tenant_id", sa.String(36), primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("order_tenant", sa.String(36)),
        sa.Column("order_id", sa.Integer),
        # The parent's tenant column paired with another column of the child.
        sa.ForeignKeyConstraint(["order_tenant", "order_id"], ["orders.tenant_id", "orders.id"]),
    )
    manager = TenancyManager(_config(citus_roles))
    await manager.initialize()
    try:
        with pytest.raises(ConfigurationError, match=r"foreign key .* does not pair the tenant columns"):
            await manager.register_tenant("alpha", "Alpha", app_metadata=metadata)
    finally:
        await manager.close()


async def _cli(roles: Roles, *args: str) -> tuple[int, str]:
    env = {
        "TENANCY_DATABASE_URL": roles.app_url,
        "TENANCY_DATABASE_OWNER_URL": roles.owner_url,
        "TENANCY_ISOLATION_STRATEGY": "rls",
    }
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return result.exit_code, f"{result.output}{result.exception!r}"
    return result.exit_code, result.output


async def test_tenants_move_isolates_a_tenant_and_moves_it_under_writers_losing_none(
    citus_roles: Roles,
) -> None:
    manager = TenancyManager(_config(citus_roles))
    await manager.initialize()
    try:
        for identifier, rows in ROWS.items():
            tenant = await manager.register_tenant(identifier, identifier, app_metadata=SharedOrder.metadata)
            async with manager.session(tenant) as session:
                session.add_all(SharedOrder(id=i, description=d) for i, d in rows.items())
                await session.commit()
        code, output = await _cli(citus_roles, "--json", "tenants", "list")
        assert code == 0, output
        nodes = {row["identifier"]: row["node"] for row in json.loads(output)}
        source = nodes["alpha"]
        cluster = manager.isolation.cluster
        assert cluster is not None
        target = next(n.address for n in await cluster.nodes() if n.holds_shards and n.address != source)
        admin = citus_roles.admin_url  # a superuser: it bypasses row-level security

        # Refused without a role that bypasses row-level security: the owner would copy no row.
        code, output = await _cli(citus_roles, "tenants", "move", "alpha", "--to", target)
        assert code == 2 and "--admin-url" in output, output
        code, output = await _cli(
            citus_roles, "tenants", "move", "alpha", "--to", target, "--admin-url", citus_roles.owner_url
        )
        assert code == 2 and "does not bypass row-level security" in output, output

        acknowledged: list[int] = []
        statuses: dict[int, int] = {}
        moving, moved = asyncio.Event(), asyncio.Event()
        ids = itertools.count(1000)
        transport = httpx.ASGITransport(app=build_app(manager, SharedOrder))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

            async def write() -> None:
                after = 0  # writes after the move, on the tenant's new node
                while after < 10:
                    after += moved.is_set()
                    order_id = next(ids)
                    response = await client.post(
                        "/orders",
                        params={"order_id": order_id, "description": "a write"},
                        headers={"X-Tenant-ID": "alpha"},
                    )
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code == 200:
                        acknowledged.append(order_id)
                        if len(acknowledged) == 20:
                            moving.set()

            writers = [asyncio.create_task(write()) for _ in range(4)]
            try:
                await asyncio.wait_for(moving.wait(), 60)
                during = len(acknowledged)
                code, output = await _cli(
                    citus_roles, "--json", "tenants", "move", "alpha", "--to", target, "--admin-url", admin
                )
            finally:
                moved.set()
                if not moving.is_set():
                    for writer in writers:
                        writer.cancel()
                await asyncio.gather(*writers, return_exceptions=True)
            assert code == 0, output
            move = json.loads(output)
            assert (move["from"], move["to"]) == (source, target) and move["seconds"] > 0, move
            assert len(acknowledged) > during, "no write was acknowledged while the tenant moved"
            listed = await client.get("/orders", headers={"X-Tenant-ID": "alpha"})
            stored = sorted(order["id"] for order in listed.json()["orders"])
        # Zero lost writes: every acknowledged order is there, once, and nothing else is.
        assert stored == sorted([*ROWS["alpha"], *acknowledged]), (len(stored), len(acknowledged))
        assert set(statuses) <= {200, 503}, statuses
        async with manager.session("beta") as session:  # the tenant sharing its old shard: intact
            found = dict((await session.execute(sa.select(SharedOrder.id, SharedOrder.description))).all())
            assert found == ROWS["beta"]

        code, output = await _cli(citus_roles, "--json", "tenants", "show", "alpha")
        assert code == 0 and json.loads(output)["node"] == target, output
        # Alone in its shard now, on that node: a router plan there.
        alpha = await manager.get_tenant("alpha")
        plan = await _plan(manager, "alpha", f"SELECT * FROM orders WHERE tenant_id = '{alpha.id}'")  # noqa: S608
        assert "Task Count: 1" in plan and f"port={target.split(':')[1]}" in plan, plan
        code, output = await _cli(
            citus_roles,
            "--json",
            "tenants",
            "move",
            "alpha",
            "--to",
            target,
            "--admin-url",
            citus_roles.admin_url,
        )
        assert code == 0 and json.loads(output)["seconds"] == 0, output  # there already
    finally:
        await manager.close()


async def test_hybrid_tenants_move_between_the_distributed_tiers(citus_roles: Roles) -> None:
    manager = TenancyManager(_config(citus_roles, isolation_strategy="hybrid"))
    await manager.initialize()
    try:
        for identifier, rows in ROWS.items():
            tenant = await manager.register_tenant(
                identifier, identifier, app_metadata=SharedOrder.metadata, tier="rls"
            )
            async with manager.session(tenant) as session:
                session.add_all(SharedOrder(id=i, description=d) for i, d in rows.items())
                await session.commit()
        # rls -> schema: alpha's rows leave the distributed tables for a distributed schema.
        await manager.move_tenant("alpha", "schema", app_metadata=SharedOrder.metadata)
        await manager.remove_old_copy("alpha")
        cluster = manager.isolation.parts()[0].cluster
        assert cluster is not None and "tenant_alpha" in await cluster.placements(["tenant_alpha"])
        # and back: schema -> rls.
        await manager.move_tenant("alpha", "rls", app_metadata=SharedOrder.metadata)
        await manager.remove_old_copy("alpha")
        for identifier, rows in ROWS.items():
            async with manager.session(identifier) as session:
                found = dict(
                    (await session.execute(sa.select(SharedOrder.id, SharedOrder.description))).all()
                )
                assert found == rows, identifier
        code, output = await _cli_hybrid(citus_roles, "--json", "tenants", "list")
        assert code == 0 and all(row["node"] for row in json.loads(output)), output
    finally:
        await manager.close()


async def _cli_hybrid(roles: Roles, *args: str) -> tuple[int, str]:
    env = {
        "TENANCY_DATABASE_URL": roles.app_url,
        "TENANCY_DATABASE_OWNER_URL": roles.owner_url,
        "TENANCY_ISOLATION_STRATEGY": "hybrid",
    }
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, list(args), env=env)
    return result.exit_code, result.output


async def test_a_clone_of_an_rls_tenant_on_the_cluster_has_its_rows_and_no_others(
    seeded: TenancyManager,
) -> None:
    await seeded.clone_tenant("alpha", "gamma")
    async with seeded.session("gamma") as session:
        found = dict((await session.execute(sa.select(Order.id, Order.description))).all())
        assert found == ROWS["alpha"]
        assert set((await session.execute(sa.select(Line.order_id))).scalars()) == set(ROWS["alpha"])
    async with seeded.session("beta") as session:
        found = dict((await session.execute(sa.select(Order.id, Order.description))).all())
        assert found == ROWS["beta"]
