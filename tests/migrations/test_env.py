"""The env.py helpers through Alembic's own command line: one tenant, and the shared tables."""

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from fastapi_tenancy import TenancyManager

from .projects import make_project

pytestmark = pytest.mark.postgres

ALEMBIC = Path(sys.executable).parent / "alembic"

SHARED_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "s1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("plans", sa.Column("id", sa.Integer, primary_key=True))


def downgrade() -> None:
    op.drop_table("plans")
"""


def alembic(
    url: str, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}
    environment.update({"TENANCY_DATABASE_URL": url, **(env or {})})
    return subprocess.run(
        [str(ALEMBIC), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_alembic_migrates_one_tenant_and_the_shared_tables_apart(
    manager: TenancyManager, postgres_url: str, tmp_path: Path
) -> None:
    ini = make_project(tmp_path)
    (tmp_path / "migrations" / "shared" / "versions" / "s1.py").write_text(SHARED_REVISION)
    for slug in ("acme", "globex"):
        await manager.register_tenant(slug, slug)
    done = alembic(
        postgres_url, tmp_path, "-c", str(ini), "--name", "tenant", "-x", "tenant=acme", "upgrade", "head"
    )
    assert done.returncode == 0, done.stderr
    # TENANCY_TENANT names the tenant too (as `fastapi-tenancy run` sets it).
    done = alembic(
        postgres_url,
        tmp_path,
        "-c",
        str(ini),
        "--name",
        "tenant",
        "upgrade",
        "a1",
        env={"TENANCY_TENANT": "globex"},
    )
    assert done.returncode == 0, done.stderr
    done = alembic(postgres_url, tmp_path, "-c", str(ini), "--name", "shared", "upgrade", "head")
    assert done.returncode == 0, done.stderr
    # No tenant named: refused, nothing migrated in public.
    done = alembic(postgres_url, tmp_path, "-c", str(ini), "--name", "tenant", "upgrade", "head")
    assert done.returncode != 0 and "no tenant to migrate" in done.stderr
    conn = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
    try:
        assert await conn.fetchval("SELECT version_num FROM tenant_acme.alembic_version") == "b2"
        assert await conn.fetchval("SELECT version_num FROM tenant_globex.alembic_version") == "a1"
        assert await conn.fetchval("SELECT version_num FROM public.alembic_version") == "s1"
        assert await conn.fetchval("SELECT to_regclass('public.plans')") is not None
        assert await conn.fetchval("SELECT to_regclass('public.items')") is None
        assert await conn.fetchval("SELECT to_regclass('tenant_acme.plans')") is None
        assert await conn.fetchval("SELECT to_regclass('tenant_acme.items')") is not None
    finally:
        await conn.close()


def test_offline_mode_emits_sql_scoped_to_the_tenant(tmp_path: Path) -> None:
    ini = make_project(tmp_path)
    url = "postgresql+asyncpg://nobody@127.0.0.1:1/none"
    done = alembic(
        url, tmp_path, "-c", str(ini), "--name", "tenant", "-x", "tenant=acme", "upgrade", "a1", "--sql"
    )
    assert done.returncode == 0, done.stderr
    assert 'SET LOCAL search_path TO "tenant_acme"' in done.stdout
    assert "CREATE TABLE tenant_acme.alembic_version" in done.stdout
