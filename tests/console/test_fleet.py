"""The console's fleet page on real PostgreSQL: an upgrade started, followed and read back; the audit."""

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.audit import SQLAuditWriter

from ..migrations.projects import make_project
from ..migrations.test_fleet import _raw
from .conftest import HOSTILE, Site, mount

pytestmark = pytest.mark.postgres

# A third revision that fails in a schema holding `hostile_error`, with that table's text as
# the error: what a failed tenant's row shows is whatever its data made the migration say.
REVISION_C = """
from alembic import op

revision = "c3"
down_revision = "b2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "DO $$ DECLARE m text; BEGIN IF to_regclass('hostile_error') IS NOT NULL THEN "
        "SELECT msg INTO m FROM hostile_error; RAISE EXCEPTION USING MESSAGE = m; END IF; END $$"
    )


def downgrade() -> None:
    pass
"""


def project(root: Path, sleep: float = 0.0) -> Path:
    """The migration tests' project (revisions a1, b2) with c3 above: its alembic.ini."""
    ini = make_project(root, sleep=sleep)
    (root / "migrations" / "tenant" / "versions" / "c3.py").write_text(REVISION_C)
    return ini


@dataclass
class Fleet:
    site: Site
    url: str


@pytest.fixture
async def fleet(postgres_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    """Three tenants with empty schemas (one whose migration fails), the console able to upgrade them."""
    ini = project(tmp_path / "project", sleep=0.3)
    manager = TenancyManager(TenancyConfig(database_url=postgres_url, database_pool_size=2))
    await manager.initialize()
    try:
        for slug in ("acme", "broken", "globex"):
            await manager.register_tenant(slug, slug.title())
        conn = await _raw(postgres_url)
        try:
            await conn.execute("CREATE TABLE tenant_broken.hostile_error (msg text)")
            await conn.execute("INSERT INTO tenant_broken.hostile_error VALUES ($1)", HOSTILE)
        finally:
            await conn.close()
        app, console = mount(manager, alembic_config=ini)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://app.test"
        ) as client:
            yield Fleet(Site(manager, console, app, client, token_page="/tenants/acme"), postgres_url)
        await console.close()
    finally:
        await manager.close()


async def test_an_upgrade_started_in_the_console_is_followed_to_its_end_and_audited(fleet: Fleet) -> None:
    site = fleet.site
    before = await site.page("/fleet")
    assert "No fleet run recorded yet" in before.text and "Start upgrade" in before.text
    started = await site.post(
        "/fleet/upgrade", {"target": "head", "canary": "1", "concurrency": "2"}, token=None
    )
    assert started.status_code == 303 and started.headers["location"] == "/_tenancy/fleet?done=started"
    job = site.console.fleet.job
    assert job is not None and job.task is not None
    running = await site.page("/fleet?done=started")
    # While it runs, the page follows it (a refresh, no script) and offers no second start.
    assert "Fleet upgrade started." in running.text
    assert 'http-equiv="refresh"' in running.text and "<progress" in running.text
    assert "Start upgrade" not in running.text
    await job.task
    assert job.finished and job.run_id is not None and (job.planned, job.done, job.failed) == (3, 3, 1)

    after = await site.page("/fleet")
    assert 'http-equiv="refresh"' not in after.text
    assert f'href="/_tenancy/fleet/runs/{job.run_id}"' in after.text
    run = await site.page(f"/fleet/runs/{job.run_id}")
    assert run.status_code == 200, run.text
    assert "2 ok, 1 failed, 0 skipped" in run.text
    rows = re.findall(
        r'<a href="/_tenancy/tenants/([a-z-]+)">\1</a></td>\s*<td><span class="badge badge-(\w+)"', run.text
    )
    assert rows == [("acme", "ok"), ("broken", "failed"), ("globex", "ok")]
    # The failed tenant's error, whatever its data made it say, is text.
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in run.text and "<script>window" not in run.text
    failed = await site.page(f"/fleet/runs/{job.run_id}?status=failed")
    assert re.findall(r'<a href="/_tenancy/tenants/([a-z-]+)">', failed.text) == ["broken"]

    audit = site.manager.events.audit
    assert isinstance(audit, SQLAuditWriter)
    for slug in ("acme", "globex", "broken"):
        tenant = await site.manager.get_tenant(slug)
        migrated = [e for e in await audit.entries(tenant_id=tenant.id) if e.event == "migrated"]
        if slug == "broken":
            assert migrated == []
        else:
            assert [(e.actor, e.details["to_revision"]) for e in migrated] == [("console:alice", "c3")]

    revisions = await site.page("/fleet/revisions")
    assert "1 of 1 tenants not at head" in revisions.text and "/_tenancy/tenants/broken" in revisions.text
    detail = await site.page("/tenants/acme")
    assert "c3 (at head)" in detail.text and "console:alice" in detail.text


async def test_no_upgrade_starts_while_another_process_runs_one(fleet: Fleet) -> None:
    site = fleet.site
    holder = await _raw(fleet.url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", 0x7E4A_F1EE)  # a CLI run, say
        page = await site.page("/fleet")
        assert "A fleet migration is running against this database now" in page.text
        assert 'http-equiv="refresh"' in page.text and "Start upgrade" not in page.text
        refused = await site.post("/fleet/upgrade", {"target": "head"})
        assert refused.status_code == 409 and "wait for it to end" in refused.text
    finally:
        await holder.close()
    assert site.console.fleet.job is None
    for target in ("head; DROP TABLE x", "a" * 65, "-", "../../etc"):
        bad = await site.post("/fleet/upgrade", {"target": target})
        assert bad.status_code == 400, target
    for canary, concurrency in [("-1", "2"), ("1", "0"), ("x", "2"), ("1", "33")]:
        bad = await site.post(
            "/fleet/upgrade", {"target": "head", "canary": canary, "concurrency": concurrency}
        )
        assert bad.status_code == 400, (canary, concurrency)
    assert site.console.fleet.job is None
