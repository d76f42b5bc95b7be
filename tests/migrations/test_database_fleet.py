"""The fleet runner with database isolation: each tenant migrated in its own database, on two servers."""

import asyncio
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.encryption import URLCipher
from fastapi_tenancy.migrations.fleet import FleetMigrator
from fastapi_tenancy.migrations.results import TenantResult
from tests.isolation.databases import dropped_afterwards
from tests.isolation.test_database import second_cluster  # noqa: F401 - a fixture: a private cluster

from .projects import make_project

pytestmark = pytest.mark.postgres


async def _sql(server: str, database: str, statement: str) -> list[asyncpg.Record]:
    url = make_url(server)
    conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=database)
    try:
        return list(await conn.fetch(statement))
    finally:
        await conn.close()


async def _version(server: str, database: str) -> str | None:
    rows = await _sql(
        server,
        database,
        "SELECT CASE WHEN to_regclass('alembic_version') IS NULL THEN NULL "
        "ELSE (SELECT string_agg(version_num, ',') FROM alembic_version) END",
    )
    return rows[0][0]  # type: ignore[no-any-return]


def _statuses(results: list[TenantResult]) -> dict[str, str]:
    return {r.tenant: r.status for r in results}


async def test_database_tenants_are_migrated_in_their_own_databases_and_resume(
    postgres_url: str,
    second_cluster: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    ini = make_project(tmp_path / "p")
    registry = make_url(postgres_url).database
    assert registry is not None
    second = make_url(second_cluster).set(database="postgres").render_as_string(hide_password=False)
    async with dropped_afterwards(postgres_url) as prefix, dropped_afterwards(second_cluster, prefix):
        manager = TenancyManager(
            TenancyConfig(
                database_url=postgres_url,
                database_pool_size=2,
                isolation_strategy="database",
                schema_prefix=prefix,
                encryption_keys=[URLCipher.generate_key()],  # type: ignore[list-item]
            )
        )
        await manager.initialize()
        migrator = FleetMigrator(manager, ini, concurrency=2)
        try:
            await manager.register_tenant("acme", "Acme")  # on the registry's server
            await manager.register_tenant("globex", "Globex", database_url=second)  # its own server
            acme, globex = (postgres_url, f"{prefix}acme"), (second_cluster, f"{prefix}globex")

            first = await migrator.run("upgrade", "a1")
            assert first.succeeded and _statuses(first.results) == {"acme": "ok", "globex": "ok"}
            for server, database in (acme, globex):
                assert await _version(server, database) == "a1"
                # The migration ran in the tenant's database, in its default schema.
                assert [r[0] for r in await _sql(server, database, "SELECT schema FROM marks")] == ["public"]
            # Nothing of the tenants' migrations reached the registry database.
            assert await _sql(postgres_url, registry, "SELECT to_regclass('public.items')") == [(None,)]
            assert await _sql(postgres_url, registry, "SELECT to_regclass('public.alembic_version')") == [
                (None,)
            ]
            assert [(m.tenant, m.versions, m.at_target) for m in await migrator.status("a1")] == [
                ("acme", ("a1",), True),
                ("globex", ("a1",), True),
            ]

            # A failure in one tenant's database is recorded in the registry; the other goes on.
            await _sql(*globex, "CREATE TABLE fail_here (x int)")
            failed = await migrator.run("upgrade", "head")
            assert _statuses(failed.results) == {"acme": "ok", "globex": "failed"}
            [error] = [r.error for r in failed.results if r.status == "failed"]
            assert error is not None and "boom" in error and "postgres@" not in error
            recorded = await _sql(
                postgres_url,
                registry,
                "SELECT tenant, status FROM public.tenancy_migration_results "  # noqa: S608 - our own run id
                f"WHERE run_id = '{failed.run_id}'",
            )
            assert dict(recorded) == {"acme": "ok", "globex": "failed"}
            assert await _version(*globex) == "a1"  # rolled back in its own database

            # Fixed and run again: only the failed tenant is migrated; acme is skipped unread by Alembic.
            await _sql(*globex, "DROP TABLE fail_here")
            again = await migrator.run("upgrade", "head")
            assert again.succeeded and _statuses(again.results) == {"acme": "skipped", "globex": "ok"}
            assert await _version(*acme) == await _version(*globex) == "b2"
            noop = await migrator.run("upgrade", "head")
            assert _statuses(noop.results) == {"acme": "skipped", "globex": "skipped"}

            # Interrupted after the first tenant, then resumed: finished tenants are not redone.
            stopped = asyncio.Event()

            def on_result(result: TenantResult) -> None:
                stopped.set()

            one_at_a_time = FleetMigrator(manager, ini, concurrency=1)
            try:
                run = asyncio.create_task(one_at_a_time.run("downgrade", "a1", on_result=on_result))
                await stopped.wait()
                run.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await run
                done_before = {
                    row[0]
                    for row in await _sql(
                        postgres_url,
                        registry,
                        "SELECT r.tenant FROM public.tenancy_migration_results r JOIN "
                        "public.tenancy_migration_runs u USING (run_id) "
                        "WHERE u.direction = 'downgrade' AND r.status = 'ok'",
                    )
                }
                assert done_before
                resumed = await one_at_a_time.run("downgrade", "a1")
            finally:
                await one_at_a_time.close()
            assert resumed.resumed and resumed.succeeded
            assert not {r.tenant for r in resumed.results if r.status == "ok"} & done_before
            assert await _version(*acme) == await _version(*globex) == "a1"
        finally:
            await migrator.close()
            for slug in ("acme", "globex"):
                await manager.delete_tenant(slug, destroy_data=True)
            await manager.close()


async def test_alembic_migrates_one_tenant_database_named_on_the_command_line(
    postgres_url: str, tmp_path: Path
) -> None:
    from tests.cli.test_cli import cli_json

    from .test_env import alembic

    ini = make_project(tmp_path)
    registry = make_url(postgres_url).database
    assert registry is not None
    async with dropped_afterwards(postgres_url) as prefix:
        manager = TenancyManager(
            TenancyConfig(
                database_url=postgres_url,
                database_pool_size=2,
                isolation_strategy="database",
                schema_prefix=prefix,
            )
        )
        await manager.initialize()
        try:
            await manager.register_tenant("acme", "Acme")
            env = {"TENANCY_ISOLATION_STRATEGY": "database", "TENANCY_SCHEMA_PREFIX": prefix}
            args = ("-c", str(ini), "--name", "tenant", "-x", "tenant=acme", "upgrade", "head")
            done = alembic(postgres_url, tmp_path, *args, env=env)
            assert done.returncode == 0, done.stderr
            assert await _version(postgres_url, f"{prefix}acme") == "b2"
            assert await _sql(postgres_url, registry, "SELECT to_regclass('public.alembic_version')") == [
                (None,)
            ]
            # The console script reads that database's version too.
            code, status = cli_json(postgres_url, "migrate", "status", "--config", str(ini), env=env)
            assert code == 0, status
            assert [(r["tenant"], r["schema"], r["revision"]) for r in status] == [
                ("acme", f"{prefix}acme", "b2")
            ]
        finally:
            await manager.delete_tenant("acme", destroy_data=True)
            await manager.close()
