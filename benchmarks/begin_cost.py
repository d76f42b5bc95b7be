"""What the incarnation check in the `BEGIN` message costs PostgreSQL, per transaction.

Sends the messages of one schema-isolated `GET /orders` (the `BEGIN` message with the
connection reset and the tenant's setting, the prepared `SELECT`, the `ROLLBACK`
message) over one asyncpg connection, `--transactions` times per round, spreading them
over `--tenants` schemas, in alternating rounds for each variant of the `BEGIN` message:

- `none`: the reset and `SET LOCAL search_path` alone (before incarnations);
- `lock`: plus `LOCK TABLE <schema>."fastapi_tenancy:<id>" IN ACCESS SHARE MODE NOWAIT`,
  what the library sends (`isolation/_incarnation.py`);
- `role`: `lock` plus `SET LOCAL ROLE` to the tenant's own role, what the library sends
  with `schema_tenant_roles` (`isolation/roles.py`);
- `comment`: the design it replaced, for scale: a shared advisory lock and the schema's
  comment read by a `SELECT` that fails unless it names the tenant.

Every variant runs on one connection of a plain NOINHERIT login role made for the run,
which is granted each schema directly (what `none` and `lock` read with, as the login
role of schema isolation does) and is a member of each tenant's role (`role`).

The round trips are the same for all (one message each); what differs is the server's
work. Reported per transaction, medians of rounds: the backend's CPU time (utime + stime
from `/proc/<backend pid>/stat`, so PostgreSQL must run on this machine) and the
client's wall time.

    .venv/bin/python benchmarks/begin_cost.py [--transactions 5000] [--rounds 6] [--tenants 100]

Creates and drops its own database (`--database`, default `bench_begin_cost`) on
`TENANCY_BENCH_POSTGRES_URL` (a superuser).
"""

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fastapi_tenancy.isolation._begin import RESET_STATE  # noqa: E402
from fastapi_tenancy.isolation._incarnation import lock_marker  # noqa: E402
from fastapi_tenancy.isolation.base import marker_name  # noqa: E402
from fastapi_tenancy.isolation.roles import ROLE_SWITCH, role_name  # noqa: E402

DEFAULT_PG_BASE = "postgresql://postgres@127.0.0.1:5432"
VARIANTS = ("none", "lock", "role", "comment")


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def setting(variant: str, schema: str, tenant_id: str, database: str) -> str:
    search_path = f'SET LOCAL search_path TO "{schema}";'
    if variant == "none":
        return search_path
    if variant == "lock":
        return f"{lock_marker(schema, tenant_id)} {search_path}"
    if variant == "role":  # as SchemaIsolation._setting with tenant roles
        return f'{ROLE_SWITCH}"{role_name(schema, database)}"; {lock_marker(schema, tenant_id)} {search_path}'

    # The replaced design: a shared advisory lock, and a cast that fails unless the
    # schema's comment names the tenant.
    name = _literal(f'"{schema}"')
    key = f"pg_catalog.hashtextextended({_literal('fastapi_tenancy.storage:' + schema)}, 0)"
    marked = f"pg_catalog.obj_description({name}::pg_catalog.regnamespace, 'pg_namespace')"
    ident = _literal(tenant_id)
    check = (
        f"CAST(CASE WHEN coalesce({marked}, {ident}) = {ident} THEN 'pg_catalog' "
        f"ELSE 'another tenant' END AS pg_catalog.regnamespace)"
    )
    return f"SELECT pg_catalog.pg_advisory_xact_lock_shared({key}), {check}; {search_path}"


def backend_cpu(pid: int) -> float:
    """Seconds of CPU the backend process has used (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    base = make_url(args.pg_base)
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{args.database}"')
    finally:
        await admin.close()
    target = base.set(drivername="postgresql", database=args.database)
    login = f"{args.database}_login"
    roles = [role_name(f"tenant_{i:05d}", args.database) for i in range(args.tenants)]
    setup = await asyncpg.connect(target.render_as_string(hide_password=False))
    conn = None
    try:
        await _drop_roles(setup, [*roles, login])
        await setup.execute(f'CREATE ROLE "{login}" LOGIN NOINHERIT')
        tenants = []
        for i, role in enumerate(roles):
            schema, tenant_id = f"tenant_{i:05d}", str(uuid.uuid4())
            for statement in (
                f'CREATE SCHEMA "{schema}"',
                f'CREATE TABLE "{schema}".orders (id integer PRIMARY KEY, description text)',
                f"INSERT INTO \"{schema}\".orders VALUES (1, 'one'), (2, 'two')",  # noqa: S608 - our names
                f'CREATE VIEW "{schema}"."{marker_name(tenant_id)}" AS SELECT 1 AS tenant',
                f'COMMENT ON SCHEMA "{schema}" IS {_literal(tenant_id)}',
                f'CREATE ROLE "{role}" NOLOGIN',
                f'GRANT "{role}" TO "{login}"',
            ):
                await setup.execute(statement)
            for grantee in (login, role):
                await setup.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{grantee}"')
                await setup.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{grantee}"')
            tenants.append((schema, tenant_id))
        conn = await asyncpg.connect(target.set(username=login).render_as_string(hide_password=False))
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        # One prepared statement for every tenant, as the library's shared statements.
        await conn.execute(f'SET search_path TO "{tenants[0][0]}"')
        select = await conn.prepare("SELECT id, description FROM orders")
        await conn.execute("RESET search_path")
        begins = {
            v: [f"BEGIN; {RESET_STATE} {setting(v, s, t, args.database)}" for s, t in tenants]
            for v in VARIANTS
        }
        end = f"ROLLBACK; {RESET_STATE}"

        async def one_round(variant: str) -> tuple[float, float]:
            messages = begins[variant]
            cpu, wall = backend_cpu(pid), time.perf_counter()
            for i in range(args.transactions):
                await conn.execute(messages[i % len(messages)])
                await select.fetch()
                await conn.execute(end)
            return (
                (backend_cpu(pid) - cpu) / args.transactions * 1e6,
                (time.perf_counter() - wall) / args.transactions * 1e6,
            )

        for variant in VARIANTS:  # warm-up: plans, the catalog caches
            await one_round(variant)
        samples: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                samples[variant].append(await one_round(variant))
        return {
            v: {
                "server_cpu_us": statistics.median(s[0] for s in runs),
                "wall_us": statistics.median(s[1] for s in runs),
            }
            for v, runs in samples.items()
        }
    finally:
        if conn is not None:
            await conn.close()
        await setup.close()
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
            await _drop_roles(admin, [*roles, login])  # their grants went with the database
        finally:
            await admin.close()


async def _drop_roles(conn: asyncpg.Connection, roles: list[str]) -> None:
    for role in roles:
        await conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=5000, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--database", default="bench_begin_cost")
    parser.add_argument("--pg-base", default=os.environ.get("TENANCY_BENCH_POSTGRES_URL", DEFAULT_PG_BASE))
    args = parser.parse_args()
    results = asyncio.run(run(args))
    none = results["none"]
    print(f"{args.tenants} tenants, {args.transactions} transactions x {args.rounds} rounds per variant")
    print("variant   server CPU/txn   vs none   client wall/txn   vs none")
    for variant, r in results.items():
        print(
            f"{variant:8} {r['server_cpu_us']:12.1f} us {r['server_cpu_us'] - none['server_cpu_us']:+8.1f}"
            f" {r['wall_us']:13.1f} us {r['wall_us'] - none['wall_us']:+9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
