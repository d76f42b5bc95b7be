"""Count PostgreSQL round trips and time provisioning per isolation strategy: schema, schema
with a role per tenant (`schema_tenant_roles`), rls.

Drives the test app (`tests/apps.py`: `GET /orders` via ORM, `GET /raw` via text()) through
ASGI with the database URL pointed at `roundtrips.WireCounter`, a proxy that counts each
`Sync`/`Query` (one network round trip each) and lists the statements. RLS and tenant roles
run as a plain application role created here (NOINHERIT), with an owner role for DDL.

    .venv/bin/python benchmarks/rls_roundtrips.py [--requests 100] [--tenants 20]

Creates and drops the database `bench_rls` and its roles on TENANCY_BENCH_POSTGRES_URL.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from roundtrips import WireCounter  # noqa: E402
from tests.apps import Base, Order, SharedBase, SharedOrder, build_app  # noqa: E402

from fastapi_tenancy import TenancyConfig, TenancyManager  # noqa: E402

URL = os.environ.get("TENANCY_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
DB, OWNER, APP = "bench_rls", "bench_rls_owner", "bench_rls_app"


async def _admin(sql: list[str], database: str = "postgres") -> None:
    import asyncpg

    url = make_url(URL)
    conn = await asyncpg.connect(host=url.host, port=url.port or 5432, user=url.username, database=database)
    try:
        for statement in sql:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _measure(strategy: str, requests: int, tenants: int) -> dict[str, Any]:
    counter = WireCounter(make_url(URL).host or "127.0.0.1", make_url(URL).port or 5432)
    port = await counter.start()
    base = make_url(URL).set(host="127.0.0.1", port=port, database=DB)
    settings: dict[str, Any] = {"database_pool_size": 1, "database_max_overflow": 0}
    model: Any = Order
    metadata = Base.metadata
    if strategy == "rls":
        settings.update(
            isolation_strategy="rls", database_owner_url=base.set(username=OWNER).render_as_string()
        )
        base = base.set(username=APP)
        model, metadata = SharedOrder, SharedBase.metadata
    if strategy == "schema-roles":
        settings.update(
            schema_tenant_roles=True, database_owner_url=base.set(username=OWNER).render_as_string()
        )
        base = base.set(username=APP)
    manager = TenancyManager(TenancyConfig(database_url=base.render_as_string(), **settings))
    await manager.initialize()
    provisioning = []
    for i in range(tenants):
        started = time.perf_counter()
        tenant = await manager.register_tenant(f"t{i:03d}", f"T{i}", app_metadata=metadata)
        provisioning.append(time.perf_counter() - started)
        async with manager.session(tenant) as session:
            session.add_all(model(id=n, description=f"t{i}-{n}") for n in (1, 2))
            await session.commit()
    result: dict[str, Any] = {"provision_ms_median": round(statistics.median(provisioning) * 1000, 1)}
    transport = httpx.ASGITransport(app=build_app(manager, model))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for path in ("/orders", "/raw"):
            for i in range(20):  # warm up: prepared statements, caches
                await client.get(path, headers={"X-Tenant-ID": f"t{i % tenants:03d}"})
            counter.reset()
            for i in range(requests):
                response = await client.get(path, headers={"X-Tenant-ID": f"t{i % tenants:03d}"})
                assert response.status_code == 200, response.text
            result[f"round_trips_per_request {path}"] = counter.round_trips / requests
            counter.reset()
            await client.get(path, headers={"X-Tenant-ID": "t000"})
            result[f"statements {path}"] = [
                sql for kind, sql in counter.messages if kind in ("Query", "Bind")
            ]
    await manager.close()
    await counter.close()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--tenants", type=int, default=20)
    args = parser.parse_args()
    try:
        for strategy in ("schema", "schema-roles", "rls"):
            await _drop()  # a fresh database (and roles) per strategy
            await _admin(
                [
                    f"CREATE DATABASE {DB}",
                    f"CREATE ROLE {OWNER} LOGIN CREATEROLE",
                    f"CREATE ROLE {APP} LOGIN NOINHERIT",
                ]
            )
            await _admin([f"GRANT CREATE ON DATABASE {DB} TO {OWNER}"])  # tenant schemas (schema-roles)
            await _admin([f"GRANT CREATE, USAGE ON SCHEMA public TO {OWNER}"], DB)
            print(strategy, await _measure(strategy, args.requests, args.tenants))  # noqa: T201
    finally:
        await _drop()


async def _drop() -> None:
    # The tenants' roles (<schema>@bench_rls, tenants:bench_rls) hold grants in DB only.
    import asyncpg

    url = make_url(URL)
    conn = await asyncpg.connect(host=url.host, port=url.port or 5432, user=url.username, database="postgres")
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        made = await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE '%@' || $1 OR rolname = 'tenants:' || $1", DB
        )
        for name in [row["rolname"] for row in made] + [OWNER, APP]:
            await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
