"""Every CLI command, through the real console script, against real PostgreSQL."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.isolation.schema import SchemaIsolation
from tests.migrations.projects import make_project
from tests.migrations.test_stamp import METADATA
from tests.servers import poll

pytestmark = pytest.mark.postgres

SCRIPT = Path(sys.executable).parent / "fastapi-tenancy"


def _call(
    url: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}
    environment.update({"TENANCY_DATABASE_URL": url, "TENANCY_DATABASE_POOL_SIZE": "2", **(env or {})})
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=120,
        check=False,
    )


def cli(url: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the console script; (exit code, stdout and stderr)."""
    done = _call(url, *args, cwd=cwd, env=env)
    return done.returncode, done.stdout + done.stderr


def cli_json(
    url: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, Any]:
    """Run the console script with --json; (exit code, parsed stdout)."""
    done = _call(url, "--json", *args, cwd=cwd, env=env)
    return done.returncode, json.loads(done.stdout)


async def test_tenant_lifecycle_commands(postgres_url: str) -> None:
    # No migrations to run, no template to clone: the schema would have no tables.
    code, text = cli(postgres_url, "tenants", "create", "acme-corp")
    assert code == 2 and "would have no tables" in text and "--empty" in text
    code, created = cli_json(postgres_url, "tenants", "create", "acme-corp", "--name", "Acme", "--empty")
    assert code == 0, created
    assert created[0]["status"] == "active"
    assert cli(postgres_url, "tenants", "create", "acme-corp", "--empty")[0] == 4  # conflict
    assert cli(postgres_url, "tenants", "create", "Bad_Slug", "--empty")[0] == 2  # invalid identifier
    code, shown = cli_json(postgres_url, "tenants", "show", "acme-corp")
    assert code == 0 and shown["storage"] == "tenant_acme_corp" and shown["name"] == "Acme"
    assert cli(postgres_url, "tenants", "show", "nobody")[0] == 3
    code, suspended = cli_json(postgres_url, "tenants", "suspend", "acme-corp")
    assert code == 0 and suspended[0]["status"] == "suspended"
    code, listed = cli_json(postgres_url, "tenants", "list", "--status", "suspended")
    assert code == 0 and [t["identifier"] for t in listed] == ["acme-corp"]
    code, active = cli_json(postgres_url, "tenants", "activate", "acme-corp")
    assert code == 0 and active[0]["status"] == "active"
    code, text = cli(postgres_url, "tenants", "list")
    assert code == 0 and "acme-corp" in text
    assert cli(postgres_url, "tenants", "delete", "acme-corp", "--destroy-data")[0] == 2  # needs --yes
    code, deleted = cli_json(postgres_url, "tenants", "delete", "acme-corp")
    assert code == 0 and deleted == {"identifier": "acme-corp", "deleted": True, "data_destroyed": False}
    assert cli(postgres_url, "tenants", "activate", "acme-corp")[0] == 4  # deleted -> active refused
    code, _ = cli_json(postgres_url, "tenants", "delete", "acme-corp", "--destroy-data", "--yes")
    assert code == 0
    assert cli(postgres_url, "tenants", "show", "acme-corp")[0] == 3


async def test_tenants_create_with_alembic_config_migrates_the_new_tenant_to_head(
    postgres_url: str, tmp_path: Path
) -> None:
    import asyncpg

    ini = make_project(tmp_path / "project")
    env = {"TENANCY_ALEMBIC_CONFIG": str(ini)}
    code, created = cli_json(postgres_url, "tenants", "create", "acme", env=env)
    assert code == 0, created
    conn = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
    try:
        assert await conn.fetchval("SELECT version_num FROM tenant_acme.alembic_version") == "b2"
        assert await conn.fetchval("SELECT count(*) FROM tenant_acme.items") == 0
    finally:
        await conn.close()
    # migrate finds the project through alembic_config, wherever it runs from.
    code, status = cli_json(postgres_url, "migrate", "status", cwd=tmp_path, env=env)
    assert code == 0 and [(s["tenant"], s["revision"]) for s in status] == [("acme", "b2")]
    code, checks = cli_json(postgres_url, "doctor", env=env)
    assert code == 0, checks
    assert {c["name"]: c["status"] for c in checks}["migrations"] == "ok"


async def test_migrate_commands(manager: TenancyManager, postgres_url: str, tmp_path: Path) -> None:
    make_project(tmp_path)
    for slug in ("acme", "globex"):
        await manager.register_tenant(slug, slug)
    code, status = cli_json(postgres_url, "migrate", "status", cwd=tmp_path)
    assert code == 1 and [s["revision"] for s in status] == [None, None]  # not at head: exit 1
    code, planned = cli_json(postgres_url, "migrate", "upgrade", "--dry-run", cwd=tmp_path)
    assert code == 0 and planned["counts"]["planned"] == 2
    code, report = cli_json(postgres_url, "migrate", "upgrade", "--concurrency", "2", cwd=tmp_path)
    assert code == 0, report
    assert report["counts"]["ok"] == 2
    assert {r["to_revision"] for r in report["results"]} == {"b2"}
    code, report = cli_json(postgres_url, "migrate", "upgrade", cwd=tmp_path)
    assert code == 0 and report["counts"] == {"ok": 0, "failed": 0, "skipped": 2, "planned": 0}
    code, report = cli_json(postgres_url, "migrate", "downgrade", "a1", "--tenant", "acme", cwd=tmp_path)
    assert code == 0 and [r["to_revision"] for r in report["results"]] == ["a1"]
    # On a terminal (rich honours TTY_COMPATIBLE=1) a progress bar counts the tenants that run.
    code, text = cli(
        postgres_url, "migrate", "upgrade", cwd=tmp_path, env={"TTY_COMPATIBLE": "1", "NO_COLOR": "1"}
    )
    assert code == 0 and "1 ok" in text and "1 skipped" in text
    assert "upgrade head" in text and "1/1" in text


async def test_migrate_reports_failures_with_exit_code_1(
    manager: TenancyManager, postgres_url: str, tmp_path: Path
) -> None:
    import asyncpg

    make_project(tmp_path)
    await manager.register_tenant("acme", "Acme")
    conn = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
    await conn.execute("CREATE TABLE tenant_acme.fail_here (x int)")
    await conn.close()
    code, report = cli_json(postgres_url, "migrate", "upgrade", cwd=tmp_path)
    assert code == 1 and report["counts"]["failed"] == 1
    assert "boom" in report["results"][0]["error"]


def test_migrate_init_creates_a_project(tmp_path: Path) -> None:
    code, _ = cli("sqlite:///x.db", "migrate", "init", str(tmp_path / "proj"))
    assert code == 0
    assert (tmp_path / "proj" / "alembic.ini").is_file()
    assert (tmp_path / "proj" / "migrations" / "tenant" / "env.py").is_file()
    assert (tmp_path / "proj" / "migrations" / "shared" / "env.py").is_file()
    assert cli("sqlite:///x.db", "migrate", "init", str(tmp_path / "proj"))[0] == 4


async def test_run_executes_once_per_tenant_with_the_tenant_in_its_environment(
    manager: TenancyManager, postgres_url: str, tmp_path: Path
) -> None:
    for slug in ("acme", "globex"):
        await manager.register_tenant(slug, slug)
    log = tmp_path / "log.txt"
    script = f'echo "$TENANCY_TENANT $TENANCY_TENANT_SCHEMA" >> {log}'
    code, results = cli_json(postgres_url, "run", "--", "sh", "-c", script)
    assert code == 0
    assert results == [{"tenant": "acme", "exit_code": 0}, {"tenant": "globex", "exit_code": 0}]
    assert log.read_text().splitlines() == ["acme tenant_acme", "globex tenant_globex"]
    code, results = cli_json(postgres_url, "run", "--", "sh", "-c", '[ "$TENANCY_TENANT" = acme ]')
    assert code == 1 and [r["exit_code"] for r in results] == [0, 1]
    assert cli(postgres_url, "run")[0] == 2


async def test_doctor_passes_and_fails_on_a_pooler(
    manager: TenancyManager, postgres_url: str, pgbouncer_url: str
) -> None:
    await manager.register_tenant("acme", "Acme", app_metadata=METADATA)
    code, checks = cli_json(postgres_url, "doctor")
    assert code == 0, checks
    assert {c["name"]: c["status"] for c in checks} == {
        "configuration": "ok",
        "connectivity": "ok",
        "registry": "ok",
        "invalidation channel": "ok",
        "pooler safety": "ok",
        "tenant storage": "ok",
        "migrations": "ok",
        "template": "ok",
        "spares": "ok",
        "citus": "ok",
    }
    code, text = cli(postgres_url, "doctor", env={"TENANCY_SCHEMA_TEMPLATE": "tenancy_template"})
    assert code == 1 and "does not exist" in text
    # Behind PgBouncer without pgbouncer mode the empty search_path never reaches the server.
    code, checks = cli_json(pgbouncer_url, "doctor")
    assert code == 1
    assert {c["name"]: c["status"] for c in checks}["pooler safety"] == "fail"
    code, checks = cli_json(pgbouncer_url, "doctor", env={"TENANCY_DATABASE_PGBOUNCER": "true"})
    statuses = {c["name"]: c["status"] for c in checks}
    assert statuses["pooler safety"] == "ok", checks
    # Through PgBouncer this process cannot LISTEN, so it has no channel, while the
    # manager above, connected directly, recorded LISTEN/NOTIFY for the registry.
    assert code == 1 and [n for n, s in statuses.items() if s != "ok"] == ["invalidation channel"], checks
    assert cli("postgresql://postgres@127.0.0.1:1/nowhere", "doctor")[0] == 1


async def test_show_prints_nested_metadata_as_json(postgres_url: str) -> None:
    manager = TenancyManager(TenancyConfig(database_url=postgres_url))
    await manager.initialize()
    try:
        metadata = {"plan": "pro", "limits": {"rpm": 10, "paths": ["/a"]}, "tags": ["x"]}
        await manager.register_tenant("acme", "Acme", metadata=metadata)
    finally:
        await manager.close()
    code, shown = cli_json(postgres_url, "tenants", "show", "acme")
    assert code == 0 and shown["metadata"] == metadata


async def test_demo_shows_each_tenant_its_own_rows(postgres_url: str) -> None:
    code, rows = cli_json(postgres_url, "demo")
    assert code == 0
    assert [(r["tenant"], r["order_id"]) for r in rows] == [("demo-acme", 1), ("demo-globex", 1)]
    assert rows[0]["description"] != rows[1]["description"]
    assert cli_json(postgres_url, "demo") == (0, rows)  # idempotent


async def test_app_import_path(postgres_url: str, tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text(
        "from fastapi_tenancy import TenancyConfig, TenancyManager\n"
        "manager = TenancyManager(TenancyConfig(schema_prefix='t_'))\n"
    )
    code, created = cli_json(
        postgres_url, "--app", "myapp:manager", "tenants", "create", "acme", "--empty", cwd=tmp_path
    )
    assert code == 0, created
    code, shown = cli_json(postgres_url, "--app", "myapp:manager", "tenants", "show", "acme", cwd=tmp_path)
    assert code == 0 and shown["storage"] == "t_acme"
    assert cli(postgres_url, "--app", "myapp:nothing", "tenants", "list", cwd=tmp_path)[0] == 2


async def test_create_from_a_missing_template_fails_with_a_message(postgres_url: str) -> None:
    done = _call(
        postgres_url, "tenants", "create", "acme", env={"TENANCY_SCHEMA_TEMPLATE": "tenancy_template"}
    )
    assert done.returncode == 1
    assert "template schema 'tenancy_template' does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    assert cli(postgres_url, "tenants", "show", "acme")[0] == 3  # the registration was undone


async def test_spares_commands(postgres_url: str, tmp_path: Path) -> None:
    env = {"TENANCY_SCHEMA_TEMPLATE": "tenancy_template", "TENANCY_SCHEMA_SPARES": "2"}
    assert cli(postgres_url, "tenants", "spares", "list")[0] == 2  # not configured
    ini = make_project(tmp_path / "p")
    code, text = cli(postgres_url, "migrate", "upgrade", "--config", str(ini), env=env)  # makes the template
    assert code == 0, text
    done = _call(postgres_url, "--json", "tenants", "spares", "fill", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"made": 2, "ready": 2}
    done = _call(postgres_url, "--json", "tenants", "spares", "list", env=env)
    listed = json.loads(done.stdout)
    assert [(s["revision"], s["current"]) for s in listed] == [("b2", True)] * 2
    code, text = cli(postgres_url, "tenants", "create", "acme", env=env)
    assert code == 0, text
    done = _call(postgres_url, "--json", "tenants", "spares", "list", env=env)
    left = [s["name"] for s in json.loads(done.stdout)]
    # One of the two was renamed to the tenant's schema (a background refill may have added one).
    assert len(set(left) & {s["name"] for s in listed}) == 1
    done = _call(postgres_url, "--json", "tenants", "spares", "drain", env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["dropped"] == len(left)
    done = _call(postgres_url, "--json", "doctor", env=env)
    [spares] = [c for c in json.loads(done.stdout) if c["name"] == "spares"]
    assert spares["status"] == "warn" and spares["detail"].startswith("0 of 2 ready"), spares


async def test_a_command_configured_for_another_channel_is_refused(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    redis = {"TENANCY_REDIS_URL": redis_url, "TENANCY_REDIS_KEY_PREFIX": redis_prefix}
    worker = TenancyManager(
        TenancyConfig(database_url=postgres_url, redis_url=redis_url, redis_key_prefix=redis_prefix)
    )
    await worker.initialize()  # the first process: records Redis
    try:
        await worker.register_tenant("acme", "Acme")
    finally:
        await worker.close()
    code, refused = cli_json(postgres_url, "tenants", "suspend", "acme")  # TENANCY_REDIS_URL forgotten
    assert code == 2, refused
    assert f"Fix: set redis_url (TENANCY_REDIS_URL) to {redis_url} and redis_key_prefix" in refused["error"]
    code, shown = cli_json(postgres_url, "tenants", "show", "acme", env=redis)
    assert code == 0 and shown["status"] == "active"  # the refused command changed nothing
    code, suspended = cli_json(postgres_url, "tenants", "suspend", "acme", env=redis)
    assert code == 0 and suspended[0]["status"] == "suspended"

    # show: the registry's channel and this process's; exit 1 when they differ.
    code, rows = cli_json(postgres_url, "invalidation", "show", env=redis)
    assert code == 0 and [r["record"] for r in rows] == ["registry", "this process"]
    assert rows[0]["channel"] == rows[1]["channel"] and rows[0]["channel"].startswith("Redis pub/sub")
    code, text = cli(postgres_url, "invalidation", "show")
    assert code == 1 and "LISTEN/NOTIFY" in text

    # record: the deliberate move to this configuration's channel (here, LISTEN/NOTIFY).
    code, text = cli(postgres_url, "invalidation", "record")
    assert code == 2 and "--yes" in text  # not without asking
    code, moved = cli_json(postgres_url, "invalidation", "record", "--yes")
    assert code == 0 and moved["old"].startswith("Redis pub/sub") and moved["new"].startswith("LISTEN/NOTIFY")
    code, _ = cli_json(postgres_url, "tenants", "activate", "acme")
    assert code == 0
    code, refused = cli_json(postgres_url, "tenants", "list", env=redis)
    assert code == 2 and "Fix: unset redis_url (TENANCY_REDIS_URL)" in refused["error"]


SEEDED_APP = """
import sqlalchemy as sa
from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.isolation.schema import SchemaIsolation

manager = TenancyManager(TenancyConfig())
notes = sa.Table("notes", sa.MetaData(), sa.Column("text", sa.Text))


@manager.provisioning.step
async def welcome(tenant, session):
    await session.execute(sa.text("CREATE TABLE IF NOT EXISTS notes (text text)"))
    await session.execute(notes.insert().values(text=f"welcome {tenant.identifier}"))


@manager.provisioning.step
async def broken(tenant, session):
    if tenant.metadata.get("break"):
        raise RuntimeError("the CRM is down")
"""


async def test_seed_runs_the_apps_provisioning_steps(postgres_url: str, tmp_path: Path) -> None:
    (tmp_path / "seeded.py").write_text(SEEDED_APP)
    app = ("--app", "seeded:manager")
    code, created = cli_json(postgres_url, *app, "tenants", "create", "acme", "--empty", cwd=tmp_path)
    assert code == 0 and created[0]["status"] == "active", created  # the steps ran at registration
    code, seeded = cli_json(postgres_url, *app, "tenants", "seed", "acme", "--step", "welcome", cwd=tmp_path)
    assert (code, seeded) == (0, {"identifier": "acme", "steps": ["welcome"]})
    manager = TenancyManager(TenancyConfig(database_url=postgres_url))
    await manager.initialize()
    try:
        async with manager.session("acme") as session:
            rows = (await session.execute(sa.text("SELECT text FROM notes"))).scalars().all()
        assert rows == ["welcome acme", "welcome acme"]
        await manager.update_tenant("acme", metadata={"break": True})
    finally:
        await manager.close()
    code, text = cli(postgres_url, *app, "tenants", "seed", "acme", cwd=tmp_path)
    text = " ".join(text.split())  # as the terminal wrapped it
    assert code == 1 and "step 'broken' failed for tenant 'acme'" in text and "the CRM is down" in text
    assert "Traceback" not in text
    code, text = cli(postgres_url, *app, "tenants", "seed", "acme", "--step", "nope", cwd=tmp_path)
    text = " ".join(text.split())
    assert code == 2 and "no provisioning step named nope (steps: welcome, broken)" in text
    # Without the app's manager there are no steps to run, and the message says where they come from.
    code, text = cli(postgres_url, "tenants", "seed", "acme")
    assert code == 2 and "--app" in text
    assert cli(postgres_url, *app, "tenants", "seed", "nobody", cwd=tmp_path)[0] == 3


async def test_maintenance_on_and_off(postgres_url: str) -> None:
    assert cli(postgres_url, "tenants", "create", "acme", "--empty")[0] == 0
    code, held = cli_json(postgres_url, "tenants", "maintenance", "on", "acme")
    assert code == 0 and held[0]["status"] == "maintenance"
    code, listed = cli_json(postgres_url, "tenants", "list", "--status", "maintenance")
    assert code == 0 and [t["identifier"] for t in listed] == ["acme"]
    code, ended = cli_json(postgres_url, "tenants", "maintenance", "off", "acme")
    assert code == 0 and ended[0]["status"] == "active"
    assert cli(postgres_url, "tenants", "suspend", "acme")[0] == 0
    code, text = cli(postgres_url, "tenants", "maintenance", "on", "acme")
    assert code == 4 and "suspended" in text  # not served anyway: refused, with the reason


async def test_tenants_adopt_marks_storage_made_outside_the_library(postgres_url: str) -> None:
    ids = {}
    for slug in ("acme-corp", "globex"):
        code, created = cli_json(postgres_url, "tenants", "create", slug, "--empty")
        assert code == 0, created
        ids[slug] = created[0]["id"]
    # acme-corp's schema as another tool (or fastapi-tenancy 0.5.0) leaves it: no marker;
    # globex's marked for someone else.
    engine = create_async_engine(postgres_url, poolclass=sa.pool.NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP VIEW tenant_acme_corp."fastapi_tenancy:{ids["acme-corp"]}"'))
            await conn.execute(sa.text(f'DROP VIEW tenant_globex."fastapi_tenancy:{ids["globex"]}"'))
            other = 'tenant_globex."fastapi_tenancy:someone-else"'
            await conn.execute(sa.text(f"CREATE VIEW {other} AS SELECT 1"))
    finally:
        await engine.dispose()
    assert cli(postgres_url, "tenants", "adopt")[0] == 2  # neither tenants nor --all
    code, rows = cli_json(postgres_url, "tenants", "adopt", "acme-corp")
    assert code == 0 and rows == [{"identifier": "acme-corp", "storage": "marked"}]
    code, rows = cli_json(postgres_url, "tenants", "adopt", "--all")
    assert code == 1, rows  # globex's storage is another tenant's: never taken over
    assert rows[0] == {"identifier": "acme-corp", "storage": "nothing to mark"}
    assert rows[1]["identifier"] == "globex" and "marked for another tenant" in rows[1]["storage"]
    code, rows = cli_json(postgres_url, "tenants", "adopt", "nobody")
    assert code == 1 and rows[0]["storage"].startswith("not adopted")


async def test_domain_commands_reach_a_running_worker_at_once(postgres_url: str) -> None:
    # A worker with a long cache TTL: only the invalidation channel (LISTEN/NOTIFY here) can
    # tell it about the CLI's changes in time.
    worker = TenancyManager(
        TenancyConfig(
            database_url=postgres_url, resolution_strategy="domain", cache_ttl=300, database_pool_size=2
        )
    )
    await worker.initialize()
    try:
        assert cli(postgres_url, "tenants", "create", "acme", "--empty")[0] == 0
        assert cli(postgres_url, "tenants", "create", "globex", "--empty")[0] == 0
        assert await worker.lookup.get_by_domain("acme.com") is None  # remembered as unknown
        code, added = cli_json(postgres_url, "tenants", "domains", "add", "acme", "ACME.com.", "--primary")
        assert code == 0 and added == [{"domain": "acme.com", "tenant": "acme", "primary": True}]
        assert await poll(lambda: _holder(worker, "acme.com", "acme"), within=1.0)
        assert cli(postgres_url, "tenants", "domains", "add", "acme", "www.acme.com")[0] == 0
        code, listed = cli_json(postgres_url, "tenants", "domains", "list", "acme")
        assert code == 0 and [(d["domain"], d["primary"]) for d in listed] == [
            ("acme.com", True),
            ("www.acme.com", False),
        ]
        code, text = cli(postgres_url, "tenants", "domains", "list", "acme")
        assert code == 0 and "www.acme.com" in text
        assert cli(postgres_url, "tenants", "domains", "add", "globex", "acme.com")[0] == 4  # taken
        code, text = cli(postgres_url, "tenants", "domains", "add", "globex", "10.0.0.1")
        assert code == 2 and "not a domain" in text
        assert cli(postgres_url, "tenants", "domains", "add", "nobody", "nobody.com")[0] == 3
        assert cli(postgres_url, "tenants", "domains", "remove", "globex", "acme.com")[0] == 3  # not its
        code, removed = cli_json(postgres_url, "tenants", "domains", "remove", "acme", "acme.com")
        assert code == 0 and removed == {"domain": "acme.com", "tenant": "acme", "removed": True}
        assert await poll(lambda: _holder(worker, "acme.com", None), within=1.0)
        # Moved to another tenant: the worker follows.
        assert cli(postgres_url, "tenants", "domains", "add", "globex", "acme.com")[0] == 0
        assert await poll(lambda: _holder(worker, "acme.com", "globex"), within=1.0)
    finally:
        await worker.close()


async def _holder(manager: TenancyManager, name: str, identifier: str | None) -> bool:
    tenant = await manager.lookup.get_by_domain(name)
    return (None if tenant is None else tenant.identifier) == identifier


async def test_clone_copies_a_tenant_with_its_rows(postgres_url: str) -> None:
    env = {"TENANCY_SCHEMA_TEMPLATE": "tenancy_template"}
    manager = TenancyManager(TenancyConfig(database_url=postgres_url, schema_template="tenancy_template"))
    await manager.initialize()
    try:
        assert isinstance(manager.isolation, SchemaIsolation)
        await manager.isolation.build_template(METADATA)
        await manager.register_tenant("acme", "Acme")
        async with manager.session("acme") as session:
            await session.execute(sa.text("INSERT INTO items (name) VALUES ('anvil'), ('rope')"))
            await session.commit()
    finally:
        await manager.close()
    # Without the template or migrations, the clone's storage would have no tables.
    code, text = cli(postgres_url, "tenants", "clone", "acme", "acme-copy")
    assert code == 2 and "would have no tables" in text
    code, cloned = cli_json(postgres_url, "tenants", "clone", "acme", "acme-copy", "--name", "Copy", env=env)
    assert code == 0, cloned
    assert (cloned[0]["identifier"], cloned[0]["name"], cloned[0]["status"]) == (
        "acme-copy",
        "Copy",
        "active",
    )
    assert cli(postgres_url, "tenants", "clone", "nobody", "other", env=env)[0] == 3
    assert cli(postgres_url, "tenants", "clone", "acme", "acme-copy", env=env)[0] == 4  # taken
    manager = TenancyManager(TenancyConfig(database_url=postgres_url))
    await manager.initialize()
    try:
        async with manager.session("acme-copy") as session:
            await session.execute(sa.text("INSERT INTO items (name) VALUES ('hammer')"))
            rows = (await session.execute(sa.text("SELECT id, name FROM items ORDER BY id"))).all()
        assert [tuple(r) for r in rows] == [(1, "anvil"), (2, "rope"), (3, "hammer")]  # the sequence goes on
    finally:
        await manager.close()
