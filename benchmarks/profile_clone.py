"""Where a template clone's time goes against `create_all`'s, step by step (issue 20).

Builds the 30-table template of `provisioning.py`, then provisions tenants
alternating two ways on one connection, each in its own transaction:

* `clone`: the steps of `clone_schema` timed one by one (existence check, the
  unsupported-object query, the catalog query printing the DDL, the DDL script), the
  script also sent phase by phase (a round trip each) to price each statement class;
* `create_all`: `CREATE SCHEMA`, the search_path, then `MetaData.create_all` with each
  statement timed by its class (CREATE TABLE, CREATE INDEX);

plus each way's commit, the client's CPU (`time.process_time`) and the server
backend's (from `/proc`, so PostgreSQL must run on this machine). Then round trips
of each way through `roundtrips.py`'s wire counter, `EXPLAIN ANALYZE` of the catalog
query, and with `--cprofile` the client functions of each way.

    .venv/bin/python benchmarks/profile_clone.py --tenants 20 [--cprofile]
"""

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from provisioning import thirty_tables, throwaway_database  # noqa: E402
from roundtrips import WireCounter  # noqa: E402

from fastapi_tenancy.isolation import clone  # noqa: E402
from fastapi_tenancy.isolation.base import create_tables, tenant_tables  # noqa: E402
from fastapi_tenancy.isolation.schema import SchemaIsolation  # noqa: E402

PHASES = {
    1: "enum types",
    2: "sequences",
    3: "CREATE TABLE (LIKE)",
    4: "enum columns",
    5: "defaults + PK/unique/check (ALTER TABLE)",
    6: "sequence OWNED BY",
    8: "foreign keys (ALTER TABLE)",
    9: "indexes",
    10: "comments",
    11: "alembic_version rows",
}


def backend_cpu(pid: int) -> float:
    """Seconds of CPU the backend process has used (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


async def driver(conn: AsyncConnection) -> Any:
    raw = await conn.get_raw_connection()
    return raw.driver_connection


async def clone_steps(
    conn: AsyncConnection, template: str, target: str, into: dict[str, list[float]]
) -> None:
    """`clone_schema`, step by step, the DDL phase by phase."""

    async def step(name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        result = await work()
        into[name].append(time.perf_counter() - started)
        return result

    await step(
        "exists",
        lambda: conn.scalar(sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": template}),
    )
    await step("unsupported query", lambda: conn.execute(clone._UNSUPPORTED, {"t": template}))  # noqa: SLF001
    await step("search_path", lambda: conn.exec_driver_sql(clone._SET_SEARCH_PATH, (f'"{template}"',)))  # noqa: SLF001
    rows = await step("catalog query", lambda: conn.execute(clone._CLONE_SCRIPT, {"t": template}))  # noqa: SLF001
    by_phase: dict[int, list[str]] = defaultdict(list)
    for row in rows:
        by_phase[row.phase].append(row.stmt)
    pg = await driver(conn)
    await step(
        "CREATE SCHEMA + search_path",
        lambda: pg.execute(
            f"CREATE SCHEMA \"{target}\"; SELECT set_config('search_path', '\"{target}\"', true)"
        ),
    )
    for phase, statements in sorted(by_phase.items()):
        await step(f"ddl {phase}: {PHASES[phase]}", lambda s=statements: pg.execute(";\n".join(s)))  # type: ignore[misc]


async def clone_whole(
    conn: AsyncConnection, template: str, target: str, into: dict[str, list[float]]
) -> None:
    started = time.perf_counter()
    await clone.clone_schema(conn, template, target)
    into["clone_schema (as shipped)"].append(time.perf_counter() - started)


async def create_all_steps(
    conn: AsyncConnection, metadata: sa.MetaData, target: str, into: dict[str, list[float]]
) -> None:
    started = time.perf_counter()
    await conn.execute(sa.text(f'CREATE SCHEMA "{target}"'))
    await conn.exec_driver_sql(clone._SET_SEARCH_PATH, (f'"{target}"',))  # noqa: SLF001
    into["CREATE SCHEMA + search_path"].append(time.perf_counter() - started)
    await conn.execution_options(schema_translate_map={None: target}, timed=True)
    started = time.perf_counter()
    await conn.run_sync(create_tables, tenant_tables(metadata))
    into["create_all"].append(time.perf_counter() - started)


def statement_timer(engine: Any, into: dict[str, list[float]]) -> Callable[[], None]:
    """Time every statement on `engine` by its first two words; returns a function that removes the hooks."""
    sync = engine.sync_engine
    started: dict[int, float] = {}
    per_tenant: dict[str, float] = defaultdict(float)

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started[id(cursor)] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not conn.get_execution_options().get("timed"):
            return
        kind = " ".join(statement.split()[:2]).upper()
        per_tenant[f"stmt {kind}"] += time.perf_counter() - started.pop(id(cursor))
        per_tenant[f"count {kind}"] += 1

    sa.event.listen(sync, "before_cursor_execute", before)
    sa.event.listen(sync, "after_cursor_execute", after)

    def flush() -> None:
        for key, value in per_tenant.items():
            into[key].append(value)
        per_tenant.clear()

    return flush


async def timed_transaction(
    engine: Any, work: Callable[[AsyncConnection], Awaitable[None]], into: dict[str, list[float]]
) -> None:
    async with engine.connect() as conn:
        pid = (await driver(conn)).get_server_pid()
        cpu_server, cpu_client = backend_cpu(pid), time.process_time()
        started = time.perf_counter()
        await conn.begin()
        await work(conn)
        committing = time.perf_counter()
        await conn.commit()
        ended = time.perf_counter()
        into["commit"].append(ended - committing)
        into["total"].append(ended - started)
        into["client cpu"].append(time.process_time() - cpu_client)
        into["server cpu (10 ms ticks)"].append(backend_cpu(pid) - cpu_server)


async def round_trips(url: str, metadata: sa.MetaData) -> dict[str, Any]:
    """Wire round trips of one clone and one create_all (each after one warm-up)."""
    server = make_url(url)
    counter = WireCounter(server.host or "127.0.0.1", server.port or 5432)
    port = await counter.start()
    engine = create_async_engine(server.set(host="127.0.0.1", port=port), pool_size=1, max_overflow=0)
    SchemaIsolation(engine, template="tmpl")  # sends settings with BEGIN, as the app's engine
    out: dict[str, Any] = {}
    try:
        for way in ("clone", "create_all"):
            for attempt in ("warm", "counted"):
                target = f"rt_{way}_{attempt}"
                async with engine.connect() as conn:
                    await conn.begin()
                    counter.reset()
                    if way == "clone":
                        await clone.clone_schema(conn, "tmpl", target)
                    else:
                        await create_all_steps(conn, metadata, target, defaultdict(list))
                    await conn.commit()
                if attempt == "counted":
                    kinds: dict[str, int] = defaultdict(int)
                    for kind, sql in counter.messages:
                        if kind in ("Query", "Parse"):
                            kinds[f"{kind} {' '.join(sql.split()[:2]).upper()}"] += 1
                    out[way] = {"round_trips": counter.round_trips, "messages": dict(kinds)}
    finally:
        await engine.dispose()
        await counter.close()
    return out


async def explain_catalog(engine: Any, full: bool = False) -> list[str]:
    async with engine.begin() as conn:
        await conn.exec_driver_sql(clone._SET_SEARCH_PATH, ('"tmpl"',))  # noqa: SLF001
        query = sa.text("EXPLAIN (ANALYZE, BUFFERS, SUMMARY) " + clone._CLONE_SCRIPT.text)  # noqa: SLF001
        plan = [row[0] for row in await conn.execute(query, {"t": "tmpl"})]
    if full:
        return plan
    return [line for line in plan if "Time" in line or "Buffers: shared" in line][-4:]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=20, help="per way")
    parser.add_argument(
        "--fleet", type=int, default=0, help="clone this many schemas first (a catalog as big as a fleet's)"
    )
    parser.add_argument("--explain", action="store_true", help="print the catalog query's whole plan")
    parser.add_argument("--cprofile", action="store_true", help="also profile each way's client CPU")
    args = parser.parse_args()
    admin, database, url = await throwaway_database("bench_clone_")
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    metadata = thirty_tables()
    isolation = SchemaIsolation(engine, template="tmpl")
    result: dict[str, Any] = {"tenants_per_way": args.tenants, "load_before": os.getloadavg()}
    try:
        await isolation.build_template(metadata)
        for i in range(args.fleet):
            async with engine.begin() as conn:
                await clone.clone_schema(conn, "tmpl", f"fleet_{i}")
        result["load_before"] = os.getloadavg()
        ways: dict[str, dict[str, list[float]]] = {
            "clone (steps)": defaultdict(list),
            "clone (as shipped)": defaultdict(list),
            "create_all": defaultdict(list),
        }
        flush = statement_timer(engine, ways["create_all"])
        for i in range(args.tenants + 2):  # the first two warm up
            if i == 2:
                for values in ways.values():
                    values.clear()
            await timed_transaction(
                engine,
                lambda c, i=i: clone_steps(c, "tmpl", f"steps_{i}", ways["clone (steps)"]),
                ways["clone (steps)"],
            )
            await timed_transaction(
                engine,
                lambda c, i=i: clone_whole(c, "tmpl", f"clone_{i}", ways["clone (as shipped)"]),
                ways["clone (as shipped)"],
            )
            await timed_transaction(
                engine,
                lambda c, i=i: create_all_steps(c, metadata, f"create_{i}", ways["create_all"]),
                ways["create_all"],
            )
            flush()
        result["p50_ms"] = {
            way: {k: ms(v) for k, v in steps.items() if not k.startswith("count") and "cpu" not in k}
            for way, steps in ways.items()
        }
        result["mean_cpu_ms"] = {
            way: {k: round(statistics.mean(v) * 1000, 1) for k, v in steps.items() if "cpu" in k}
            for way, steps in ways.items()
        }
        result["statements_per_create_all"] = {
            k: statistics.median(v) for k, v in ways["create_all"].items() if k.startswith("count")
        }
        async with engine.connect() as conn:
            expected = await clone.schema_catalog(conn, "create_2")
            result["identical_catalogs"] = (
                expected
                == await clone.schema_catalog(conn, "clone_2")
                == await clone.schema_catalog(conn, "steps_2")
            )
        result["explain_catalog_query"] = await explain_catalog(engine, args.explain)
        result["round_trips"] = await round_trips(url, metadata)
        if args.cprofile:
            result["cprofile"] = {}
            for way in ("clone", "create_all"):
                profiler = cProfile.Profile(time.process_time)  # CPU, not time spent waiting
                for i in range(args.tenants):
                    async with engine.begin() as conn:
                        profiler.enable()
                        if way == "clone":
                            await clone.clone_schema(conn, "tmpl", f"prof_{way}_{i}")
                        else:
                            await create_all_steps(conn, metadata, f"prof_{way}_{i}", defaultdict(list))
                        profiler.disable()
                text = io.StringIO()
                stats = pstats.Stats(profiler, stream=text)
                stats.sort_stats("tottime").print_stats(12)
                result["cprofile"][way] = {
                    "client_cpu_ms_per_tenant": round(stats.total_tt * 1000 / args.tenants, 2),  # type: ignore[attr-defined]
                    "top_tottime": [line for line in text.getvalue().splitlines() if line.strip()][-13:],
                }
        result["load_after"] = os.getloadavg()
    finally:
        await engine.dispose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
