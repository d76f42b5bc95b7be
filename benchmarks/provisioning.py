"""Registering a tenant with 30 tables: `create_all`, cloning the template, a spare, or Alembic.

Alternates the ways tenant by tenant (so machine load hits them alike), checks that
`create_all`, the clone and a claimed spare give the same catalog, and writes
`results/provisioning.json`. The spare way claims a spare schema made ahead of time
(`schema_spares`); its background refill is awaited outside the timed part, as a
pool sized for the sign-up rate would have one ready.
The `alembic_upgrade` way is what a migrations-only app does without a template: an
empty schema, then `alembic upgrade head` through 30 revisions (one table each). The
`stamped` way is `create_all` with `alembic_config` set: the tenant is then stamped at
head (its own timing: `stamp_p50_ms`), and its catalog must equal the migrated one's.

    .venv/bin/python benchmarks/provisioning.py --tenants 40
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fastapi_tenancy import TenancyConfig, TenancyManager  # noqa: E402
from fastapi_tenancy.isolation.clone import schema_catalog  # noqa: E402

T = TypeVar("T")

SERVER = os.environ.get("TENANCY_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432")


async def throwaway_database(prefix: str) -> tuple[asyncpg.Connection, str, str]:
    """A new database on `SERVER`: an admin connection (to drop it), its name and its URL."""
    database = f"{prefix}{uuid.uuid4().hex[:8]}"
    server = make_url(SERVER)
    admin = await asyncpg.connect(
        host=server.host, port=server.port or 5432, user=server.username, database="postgres"
    )
    await admin.execute(f'CREATE DATABASE "{database}"')
    return admin, database, server.set(database=database).render_as_string(hide_password=False)


def thirty_tables() -> sa.MetaData:
    """30 tables, each with a serial key, a foreign key to the previous one, an index and a check."""
    metadata = sa.MetaData()
    for i in range(30):
        columns: list[sa.schema.SchemaItem] = [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(100), nullable=False, comment="display name"),
            sa.Column("amount", sa.Numeric(12, 2), server_default=sa.text("0")),
            sa.Column("created", sa.DateTime(timezone=True), server_default=sa.func.now()),
            sa.Index(f"ix_t{i}_name", "name"),
            sa.CheckConstraint("amount >= 0", name=f"ck_t{i}_amount"),
        ]
        if i:
            columns.append(sa.Column("parent_id", sa.ForeignKey(f"t{i - 1}.id")))
        sa.Table(f"t{i}", metadata, *columns)
    return metadata


REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "r{i:02d}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "t{i}",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, comment="display name"),
        sa.Column("amount", sa.Numeric(12, 2), server_default=sa.text("0")),
        sa.Column("created", sa.DateTime(timezone=True), server_default=sa.func.now()),
        {parent}
        sa.CheckConstraint("amount >= 0", name="ck_t{i}_amount"),
    )
    op.create_index("ix_t{i}_name", "t{i}", ["name"])


def downgrade() -> None:
    pass
"""


def alembic_project(root: Path, url: str) -> Config:
    """The package's project template with 30 revisions, one table each, as `thirty_tables()`."""
    shutil.copytree(ROOT / "src" / "fastapi_tenancy" / "migrations" / "template", root)
    versions = root / "migrations" / "tenant" / "versions"
    for i in range(30):
        parent = f'sa.Column("parent_id", sa.Integer, sa.ForeignKey("t{i - 1}.id")),' if i else ""
        down = f"r{i - 1:02d}" if i else None
        (versions / f"r{i:02d}.py").write_text(REVISION.format(i=i, down=down, parent=parent))
    config = Config(str(root / "alembic.ini"), ini_section="tenant")
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["tenancy_fleet"] = True  # no logging setup
    return config


def timed(step: Callable[..., Awaitable[T]], into: list[float]) -> Callable[..., Awaitable[T]]:
    """`step`, appending how long each call took to `into`."""

    async def wrapper(*args: object, **kwargs: object) -> T:
        started = time.perf_counter()
        result = await step(*args, **kwargs)
        into.append(time.perf_counter() - started)
        return result

    return wrapper


def p50(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000, 1)


def step_timers(manager: TenancyManager, into: dict[str, list[float]]) -> None:
    """Time each registry, audit-log, publish and claim call of `manager`, by name, into `into`."""
    admin = manager.admin
    parts: list[tuple[str, object]] = [
        ("store", admin.store),
        ("audit", admin.events.audit),
        ("publish", admin.invalidation),
        ("spares", manager.isolation.spares),  # type: ignore[attr-defined]
        ("isolation", manager.isolation),
    ]
    for label, part in parts:
        if part is None:
            continue
        for name in (
            "create",
            "register",
            "update",
            "change",
            "activate",
            "get_by_identifier",
            "delete",
            "write",
            "publish",
            "claim",
            "provision",
        ):
            method = getattr(part, name, None)
            if method is None or not asyncio.iscoroutinefunction(method):
                continue
            setattr(part, name, timed(method, into.setdefault(f"{label}.{name}", [])))


async def spare_only(url: str, metadata: sa.MetaData, tenants: int, *, steps: bool) -> dict[str, object]:
    """Register `tenants` tenants from spares; their p50/p95 and, with `steps`, each call's share."""
    templated = TenancyManager(TenancyConfig(database_url=url, database_pool_size=2, schema_template="tmpl"))
    spared = TenancyManager(
        TenancyConfig(database_url=url, database_pool_size=2, schema_template="tmpl", schema_spares=1)
    )
    calls: dict[str, list[float]] = {}
    times: list[float] = []
    try:
        await templated.initialize()
        await templated.isolation.build_template(metadata)  # type: ignore[attr-defined]
        await spared.initialize()
        spares = spared.isolation.spares  # type: ignore[attr-defined]
        await spares.wait()
        if steps:
            step_timers(spared, calls)
        for i in range(tenants):
            started = time.perf_counter()
            await spared.register_tenant(f"spare-{i}", "x", app_metadata=metadata)
            times.append(time.perf_counter() - started)
            await spares.wait()  # the refill, untimed
    finally:
        await spared.close()
        await templated.close()
    return {
        "tables": 30,
        "tenants": tenants,
        "register_p50_ms": p50(times),
        "register_p95_ms": p95(times),
        "calls_per_registration": {k: round(len(v) / tenants, 2) for k, v in calls.items()},
        "call_p50_ms": {k: p50(v) for k, v in calls.items() if v},
        "load": os.getloadavg(),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=40, help="per way")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="where provisioning.json goes",
    )
    parser.add_argument(
        "--only-spare",
        action="store_true",
        help="time the spare way alone (its p50 target; no catalog comparison)",
    )
    parser.add_argument(
        "--steps",
        action="store_true",
        help="also time each registry write, audit entry and publish of the spare way",
    )
    args = parser.parse_args()
    admin, database, url = await throwaway_database("bench_prov_")
    metadata = thirty_tables()
    if args.only_spare:
        try:
            out = await spare_only(url, metadata, args.tenants, steps=args.steps)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await admin.close()
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "provisioning-spare.json").write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-prov-"))
    alembic = alembic_project(workdir / "project", url)
    plain = TenancyManager(TenancyConfig(database_url=url, database_pool_size=2))
    # Its own manager: its empty schemas must not count in create_all's storage step.
    bare = TenancyManager(TenancyConfig(database_url=url, database_pool_size=2))
    stamped = TenancyManager(
        TenancyConfig(
            database_url=url, database_pool_size=2, alembic_config=str(workdir / "project" / "alembic.ini")
        )
    )
    templated = TenancyManager(TenancyConfig(database_url=url, database_pool_size=2, schema_template="tmpl"))
    spared = TenancyManager(
        TenancyConfig(database_url=url, database_pool_size=2, schema_template="tmpl", schema_spares=1)
    )
    try:
        await plain.initialize()
        await bare.initialize()
        await stamped.initialize()
        await templated.initialize()
        await templated.isolation.build_template(metadata)  # type: ignore[attr-defined]
        await spared.initialize()
        spares = spared.isolation.spares  # type: ignore[attr-defined]
        await spares.wait()
        times: dict[str, list[float]] = {
            "create_all": [],
            "stamped": [],
            "template": [],
            "spare": [],
            "alembic_upgrade": [],
        }
        provision: dict[str, list[float]] = {"create_all": [], "stamped": [], "template": [], "spare": []}
        stamps: list[float] = []
        ways = (("create_all", plain), ("stamped", stamped), ("template", templated), ("spare", spared))
        for way, manager in ways:
            # The storage step alone (registration also writes the registry, audit log and
            # invalidation, the same for every way).
            manager.isolation.provision = timed(manager.isolation.provision, provision[way])  # type: ignore[method-assign,assignment]
        stamper = stamped._registration.stamper  # noqa: SLF001  (the timed step of the stamped way)
        assert stamper is not None
        stamper.after_provision = timed(stamper.after_provision, stamps)  # type: ignore[method-assign,assignment]
        for i in range(args.tenants):
            for way, manager in ways:
                started = time.perf_counter()
                await manager.register_tenant(f"{way.replace('_', '-')}-{i}", "x", app_metadata=metadata)
                times[way].append(time.perf_counter() - started)
            await spares.wait()  # the refill, untimed
            started = time.perf_counter()
            await bare.register_tenant(f"alembic-{i}", "x")  # an empty schema
            alembic.attributes["tenancy_schema"] = f"tenant_alembic_{i}"
            await asyncio.to_thread(command.upgrade, alembic, "head")  # env.py runs its own event loop
            times["alembic_upgrade"].append(time.perf_counter() - started)
        async with plain.engine.connect() as conn:
            expected = await schema_catalog(conn, "tenant_create_all_0")
            same = expected == await schema_catalog(conn, "tenant_template_0")
            same_spare = expected == await schema_catalog(conn, "tenant_spare_0")
            # Stamped at head, the create_all tenant is the migrated one, version table included.
            same_stamped = await schema_catalog(conn, "tenant_stamped_0") == await schema_catalog(
                conn, "tenant_alembic_0"
            )
            versions = {}
            for schema in ("tenant_stamped_0", "tenant_alembic_0"):
                query = sa.text(f"SELECT version_num FROM {schema}.alembic_version")  # noqa: S608
                versions[schema] = (await conn.execute(query)).scalar()
        out = {
            "tables": 30,
            "tenants_per_way": args.tenants,
            "register_p50_ms": {way: p50(values) for way, values in times.items()},
            "register_p95_ms": {way: p95(values) for way, values in times.items()},
            "provision_p50_ms": {way: p50(values) for way, values in provision.items()},
            "provision_p95_ms": {way: p95(values) for way, values in provision.items()},
            "stamp_p50_ms": p50(stamps),
            "stamp_p95_ms": p95(stamps),
            "register_mean_ms": {way: round(statistics.mean(v) * 1000, 1) for way, v in times.items()},
            "template_speedup_p50": {
                way: round(statistics.median(times[way]) / statistics.median(times["template"]), 2)
                for way in ("create_all", "alembic_upgrade")
            },
            "spare_speedup_p50": {
                way: round(statistics.median(times[way]) / statistics.median(times["spare"]), 1)
                for way in ("create_all", "template", "alembic_upgrade")
            },
            "identical_catalogs": same,
            "identical_catalogs_spare": same_spare,
            "identical_catalogs_stamped_migrated": same_stamped,
            "versions_stamped_migrated": versions,
            "load": os.getloadavg(),
        }
    finally:
        await spared.close()
        await templated.close()
        await stamped.close()
        await bare.close()
        await plain.close()
        shutil.rmtree(workdir, ignore_errors=True)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    results = args.output_dir
    results.mkdir(parents=True, exist_ok=True)
    (results / "provisioning.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
