"""Fleet migrations through a Citus coordinator: `fastapi-tenancy migrate upgrade` migrates the
template and the spares (plain schemas on the coordinator) and every tenant whose schema is a
distributed schema on a worker; tenants made after the upgrade, from the template or a spare,
start at its revision. Two tenants with overlapping primary keys, one on each worker."""

import asyncio
import json
from pathlib import Path

import sqlalchemy as sa
from typer.testing import CliRunner

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.cli import app as cli_app
from fastapi_tenancy.isolation.citus import CitusCluster
from fastapi_tenancy.migrations.fleet import FleetMigrator

from ..migrations.projects import TEMPLATE
from .cluster import coordinator, distributed_schemas

# a1 makes the table; b2 adds a column to it (and so to the shard on the tenant's worker).
REVISION_A = """
import sqlalchemy as sa
from alembic import op

revision = "a1"
down_revision = None


def upgrade() -> None:
    op.create_table("items", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text))


def downgrade() -> None:
    op.drop_table("items")
"""
REVISION_B = """
import sqlalchemy as sa
from alembic import op

revision = "b2"
down_revision = "a1"


def upgrade() -> None:
    op.add_column("items", sa.Column("price", sa.Integer, nullable=False, server_default="7"))
    op.create_index("items_price", "items", ["price"])


def downgrade() -> None:
    op.drop_index("items_price", "items")
    op.drop_column("items", "price")
"""


def _project(root: Path) -> Path:
    import shutil

    shutil.copytree(TEMPLATE, root, dirs_exist_ok=True)
    versions = root / "migrations" / "tenant" / "versions"
    (versions / "a1.py").write_text(REVISION_A)
    (versions / "b2.py").write_text(REVISION_B)
    ini = root / "alembic.ini"
    ini.write_text(ini.read_text().replace("%(here)s", str(root)))
    return ini


async def _cli(url: str, *args: str, **env: str) -> tuple[int, str]:
    runner = CliRunner()
    environment = {"TENANCY_DATABASE_URL": url, **env}
    result = await asyncio.to_thread(runner.invoke, cli_app, list(args), env=environment)
    return result.exit_code, result.output


async def test_migrate_upgrades_distributed_schemas_and_later_tenants_start_at_head(
    citus_url: str, tmp_path: Path
) -> None:
    ini = _project(tmp_path / "project")
    config = TenancyConfig(
        database_url=citus_url, database_pool_size=2, schema_template="tenancy_template", schema_spares=1
    )
    # The template first, at a1 (no spares yet: they are clones of it).
    builder = TenancyManager(config.model_copy(update={"schema_spares": 0}))
    await builder.initialize()
    migrator = FleetMigrator(builder, ini)
    try:
        report = await migrator.run("upgrade", "a1")
    finally:
        await migrator.close()
        await builder.close()
    assert [(r.tenant, r.status) for r in report.results] == [("(template)", "ok")], report.results

    manager = TenancyManager(config)
    await manager.initialize()
    try:
        spares = manager.isolation.spares
        assert spares is not None
        await spares.wait()  # the fill initialize() started
        await spares.fill()
        for slug in ("alpha", "beta"):  # alpha takes the spare, beta is a clone of the template
            before = [s.name for s in await spares.list_spares()]
            await manager.register_tenant(slug, slug.title())
            await spares.wait()
            if slug == "alpha":
                assert before and before[0] not in [s.name for s in await spares.list_spares()]
            async with manager.session(slug) as session:
                await session.execute(sa.text("INSERT INTO items VALUES (1, :name)"), {"name": slug})
                await session.commit()
        await spares.fill()  # a spare at a1 again
        cluster = manager.isolation.cluster
        assert isinstance(cluster, CitusCluster)
        placed = await cluster.placements(["tenant_alpha", "tenant_beta"])
        assert len(set(placed.values())) == 2, placed

        code, output = await _cli(
            citus_url,
            "--json",
            "migrate",
            "upgrade",
            "--config",
            str(ini),
            "--concurrency",  # two worker processes: each one starts an interpreter
            "2",
            TENANCY_SCHEMA_TEMPLATE="tenancy_template",
            TENANCY_SCHEMA_SPARES="1",
        )
        assert code == 0, output
        results = {r["tenant"]: (r["status"], r["to_revision"]) for r in json.loads(output)["results"]}
        spare_labels = [label for label in results if label.startswith("(spare")]
        assert len(spare_labels) == 1, results  # the spare made at a1
        assert results == dict.fromkeys(["(template)", *spare_labels, "alpha", "beta"], ("ok", "b2")), results

        # Registered after the upgrade: gamma from the spare, delta cloned from the template.
        for slug in ("gamma", "delta"):
            before = [s.name for s in await spares.list_spares()]
            await manager.register_tenant(slug, slug.title())
            if slug == "gamma":
                assert before and before[0] not in [s.name for s in await spares.list_spares()]
        for slug in ("alpha", "beta", "gamma", "delta"):
            async with manager.session(slug) as session:
                await session.execute(
                    sa.text("INSERT INTO items (id, name) VALUES (2, :name)"), {"name": slug}
                )
                await session.commit()
                rows = (await session.execute(sa.text("SELECT id, name, price FROM items ORDER BY id"))).all()
                old = [(1, slug, 7)] if slug in ("alpha", "beta") else []
                assert [tuple(r) for r in rows] == [*old, (2, slug, 7)], slug
    finally:
        await manager.close()

    conn = await coordinator(citus_url)
    try:
        # Every tenant schema distributed, each at b2; the template and the spare stay plain.
        distributed = await distributed_schemas(conn)
        assert distributed == {f"tenant_{s}" for s in ("alpha", "beta", "gamma", "delta")}
        for schema in sorted(distributed):
            assert await conn.fetchval(f'SELECT version_num FROM "{schema}".alembic_version') == "b2"  # noqa: S608
        # The column is on each worker's shard itself (the DDL went through the coordinator).
        shards = await conn.fetch(
            "SELECT nodeport, result FROM run_command_on_workers($$SELECT string_agg(c.relname, ',' "
            "ORDER BY c.relname) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname LIKE 'tenant\\_%' AND c.relname LIKE 'items\\_%' AND c.relkind = 'r' "
            "AND a.attname = 'price'$$)"
        )
        found = ",".join(r["result"] for r in shards if r["result"]).split(",")
        assert len(found) == 4, shards
    finally:
        await conn.close()
