"""Schema isolation on a Citus cluster: each tenant schema distributed by the library, placed on
one worker, its statements routed to that worker alone; moves and rebalancing keep every row."""

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_tenancy import ConfigurationError, TenancyConfig, TenancyManager
from fastapi_tenancy.doctor import run_checks
from fastapi_tenancy.isolation.base import marker_name

from ..apps import Base, Order
from .cluster import coordinator, distributed_schemas

ROWS = {"alpha": {1: "alpha-1", 2: "alpha-2"}, "beta": {1: "beta-1", 3: "beta-3"}}


async def _seeded(url: str, **settings: Any) -> TenancyManager:
    manager = TenancyManager(
        TenancyConfig(database_url=url, database_pool_size=1, database_max_overflow=0, **settings)
    )
    await manager.initialize()
    for identifier, rows in ROWS.items():
        tenant = await manager.register_tenant(identifier, identifier.title(), app_metadata=Base.metadata)
        async with manager.session(tenant) as session:
            session.add_all(Order(id=i, description=d) for i, d in rows.items())
            await session.commit()
    return manager


async def test_tenant_schemas_are_distributed_apart_and_routed_to_one_node(citus_url: str) -> None:
    manager = await _seeded(citus_url)
    try:
        cluster = manager.isolation.cluster
        assert cluster is not None and cluster.active
        placements = await cluster.placements(["tenant_alpha", "tenant_beta"])
        # Citus places new schemas round robin: two tenants land on the two workers.
        assert len(set(placements.values())) == 2, placements
        for identifier, rows in ROWS.items():
            async with manager.session(identifier) as session:
                found = {
                    row.id: row.description
                    for row in await session.execute(sa.select(Order.id, Order.description))
                }
                assert found == rows
                # The search_path in BEGIN keeps every statement to the tenant's tables: a
                # router plan, one task on the tenant's node, never a multi-shard plan.
                plan = "\n".join(
                    (await session.execute(sa.text("EXPLAIN SELECT id, description FROM orders"))).scalars()
                )
                assert "Task Count: 1" in plan, plan
                assert f"port={placements['tenant_' + identifier].split(':')[1]}" in plan, plan
        conn = await coordinator(citus_url)
        try:
            distributed = await distributed_schemas(conn)
            assert distributed == {"tenant_alpha", "tenant_beta"}
            # The incarnation marker stays a local view: a distributed one would have the LOCK
            # in every BEGIN take a lock on every node.
            alpha = await manager.get_tenant("alpha")
            assert not await conn.fetchval(
                "SELECT count(*) FROM pg_dist_object WHERE objid = to_regclass($1)",
                f'tenant_alpha."{marker_name(alpha.id)}"',
            )
        finally:
            await conn.close()
    finally:
        await manager.close()


async def test_moves_and_rebalancing_keep_every_row_and_the_routing(citus_url: str) -> None:
    manager = await _seeded(citus_url)
    try:
        cluster = manager.isolation.cluster
        assert cluster is not None
        before = await cluster.placements(["tenant_alpha", "tenant_beta"])
        target = before["tenant_beta"]
        moved = await cluster.move("tenant_alpha", target)
        assert (moved.source, moved.target) == (before["tenant_alpha"], target) and moved.seconds > 0
        assert (await cluster.move("tenant_alpha", target)).seconds == 0  # there already
        assert (await cluster.placements(["tenant_alpha"]))["tenant_alpha"] == target
        async with manager.session("alpha") as session:
            assert set((await session.execute(sa.select(Order.id))).scalars()) == set(ROWS["alpha"])
        progress: list[tuple[int, int]] = []
        moves = await cluster.rebalance(progress=lambda done, total, move: progress.append((done, total)))
        assert len(moves) == 1 and progress == [(1, 1)]
        assert len(set((await cluster.placements(["tenant_alpha", "tenant_beta"])).values())) == 2
        assert await cluster.rebalance() == []
        for identifier, rows in ROWS.items():
            async with manager.session(identifier) as session:
                assert set((await session.execute(sa.select(Order.id))).scalars()) == set(rows)
        with pytest.raises(ConfigurationError, match="not a node"):
            await cluster.move("tenant_alpha", "127.0.0.1:1")
        checks = {c.name: c for c in await run_checks(manager)}
        assert checks["citus"].status == "ok" and "2 nodes" in checks["citus"].detail, checks["citus"]
        assert checks["tenant storage"].status == "ok"
        assert checks["citus moves"].status == "ok", checks["citus moves"]
        # Workers acknowledging commits before writing them would lose writes at a switch-over
        # (ALTER DATABASE on the coordinator reaches every node).
        conn = await coordinator(citus_url)
        try:
            await conn.execute(
                f'ALTER DATABASE "{make_url(citus_url).database}" SET synchronous_commit TO off'
            )
        finally:
            await conn.close()
        settings = next(c for c in await run_checks(manager) if c.name == "citus moves")
        assert settings.status == "warn" and f"{target}: synchronous_commit=off" in settings.detail, settings
    finally:
        await manager.close()


class _SharedBase(DeclarativeBase):
    pass


class Plan(_SharedBase):
    __tablename__ = "plans"
    __table_args__ = {"schema": "public", "info": {"citus_reference": True}}
    id: Mapped[int] = mapped_column(primary_key=True)


class Subscription(_SharedBase):
    __tablename__ = "subscriptions"
    id: Mapped[int] = mapped_column(primary_key=True)
    plan_id: Mapped[int] = mapped_column(sa.ForeignKey("public.plans.id"))


async def test_flagged_shared_tables_become_reference_tables(citus_url: str) -> None:
    engine_conn = await coordinator(citus_url)
    try:
        await engine_conn.execute("CREATE TABLE public.plans (id integer PRIMARY KEY)")
        await engine_conn.execute("INSERT INTO public.plans VALUES (1)")
    finally:
        await engine_conn.close()
    manager = TenancyManager(TenancyConfig(database_url=citus_url))
    await manager.initialize()
    try:
        await manager.register_tenant("alpha", "Alpha", app_metadata=_SharedBase.metadata)
        async with manager.session("alpha") as session:
            await session.execute(sa.insert(Subscription).values(id=1, plan_id=1))
            await session.commit()
        conn = await coordinator(citus_url)
        try:
            kind = await conn.fetchval(
                "SELECT citus_table_type FROM citus_tables WHERE table_name = 'plans'::regclass"
            )
            assert kind == "reference"
        finally:
            await conn.close()
    finally:
        await manager.close()


async def test_database_cluster_citus_refuses_a_server_without_citus(postgres_url: str) -> None:
    manager = TenancyManager(TenancyConfig(database_url=postgres_url, database_cluster="citus"))
    with pytest.raises(ConfigurationError, match="citus extension is not installed"):
        await manager.initialize()
    await manager.close()
    checks = {c.name: c for c in await run_checks(manager)}
    assert checks["citus"].status == "fail" and "not installed" in checks["citus"].detail
    auto = TenancyManager(TenancyConfig(database_url=postgres_url))
    await auto.initialize()
    try:
        assert auto.isolation.cluster is not None and not auto.isolation.cluster.active
        assert {c.name: c.status for c in await run_checks(auto)}["citus"] == "ok"
    finally:
        await auto.close()


async def test_clones_of_the_template_and_spares_are_distributed_too(citus_url: str) -> None:
    config = TenancyConfig(database_url=citus_url, schema_template="tenancy_template", schema_spares=1)
    builder = TenancyManager(config.model_copy(update={"schema_spares": 0}))
    try:
        # The template stays a plain schema on the coordinator: clones copy its catalog there.
        await builder.isolation.build_template(Base.metadata)  # type: ignore[attr-defined]
    finally:
        await builder.close()
    spared = TenancyManager(config)
    await spared.initialize()
    try:
        assert spared.isolation.spares is not None
        await spared.isolation.spares.fill()
        await spared.register_tenant("alpha", "Alpha")  # a spare, renamed
    finally:
        await spared.close()
    manager = TenancyManager(config.model_copy(update={"schema_spares": 0}))
    await manager.initialize()
    try:
        await manager.register_tenant("beta", "Beta")  # a clone of the template
        for identifier in ("alpha", "beta"):
            async with manager.session(identifier) as session:
                session.add(Order(id=1, description=identifier))
                await session.commit()
            async with manager.session(identifier) as session:
                assert (await session.execute(sa.select(Order.description))).scalars().all() == [identifier]
        conn = await coordinator(citus_url)
        try:
            distributed = await distributed_schemas(conn)
            assert distributed == {"tenant_alpha", "tenant_beta"}
        finally:
            await conn.close()
    finally:
        await manager.close()
