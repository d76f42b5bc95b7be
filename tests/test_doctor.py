"""`doctor` finds tenants that would fail every request: no tables, or not at the head revision."""

from pathlib import Path

import pytest
import sqlalchemy as sa

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.doctor import CheckResult, run_checks
from tests.migrations.projects import make_project
from tests.migrations.test_stamp import METADATA

pytestmark = pytest.mark.postgres


def _check(results: list[CheckResult], name: str) -> CheckResult:
    (result,) = (r for r in results if r.name == name)
    return result


async def test_a_tenant_schema_without_tables_fails_the_storage_check(postgres_url: str) -> None:
    manager = TenancyManager(TenancyConfig(database_url=postgres_url, database_pool_size=2))
    await manager.initialize()
    try:
        await manager.register_tenant("acme", "Acme", app_metadata=METADATA)
        storage = _check(await run_checks(manager), "tenant storage")
        assert storage.status == "ok", storage
        assert _check(await run_checks(manager), "migrations").detail.startswith("not configured")
        await manager.register_tenant("globex", "Globex")  # no app_metadata, no template: empty
        storage = _check(await run_checks(manager), "tenant storage")
        assert storage.status == "fail" and "holds no table: globex" in storage.detail, storage
    finally:
        await manager.close()


async def test_with_alembic_config_a_tenant_behind_head_or_without_a_revision_fails(
    postgres_url: str, tmp_path: Path
) -> None:
    ini = make_project(tmp_path / "project")
    manager = TenancyManager(TenancyConfig(database_url=postgres_url, alembic_config=str(ini)))
    await manager.initialize()
    try:
        for slug in ("acme", "globex", "initech"):
            await manager.register_tenant(slug, slug, app_metadata=METADATA)  # stamped at b2
        migrations = _check(await run_checks(manager), "migrations")
        assert migrations == CheckResult("migrations", "ok", "all 3 at head")
        async with manager.engine.begin() as conn:
            await conn.execute(sa.text("UPDATE tenant_globex.alembic_version SET version_num = 'a1'"))
            await conn.execute(sa.text("DROP TABLE tenant_initech.alembic_version"))
        migrations = _check(await run_checks(manager), "migrations")
        assert migrations.status == "fail"
        assert "no revision (never migrated nor stamped): initech" in migrations.detail
        assert "not at head: globex (a1)" in migrations.detail
        # The tables are all there: only the revisions tell.
        assert _check(await run_checks(manager), "tenant storage").status == "ok"
    finally:
        await manager.close()
