"""Online moves into and out of the database tier: writers (inserts, updates, deletes) run
through the move of a tenant big enough that its copy takes a while; no acknowledged write is
lost, no row of the other tenant (same primary keys) comes along, the writes are held only
for the switch, and nothing of the change capture is left behind, also after a failure."""

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from fastapi_tenancy import ProvisioningError, Tenant
from fastapi_tenancy.isolation import moves
from fastapi_tenancy.isolation.capture import Capture

from ..apps import SharedBase
from .conftest import Roles
from .databases import databases, server_sql
from .test_hybrid import _admin_rows
from .test_matrix import Env, _environment, shared_settings

ROWS = 40_000  # each of beta and gamma, ids 1..ROWS (the same keys)
WRITERS = 4


@pytest.fixture
async def env(roles: Roles) -> AsyncIterator[Env]:
    # alpha in its own schema, beta in the shared tables; the database tier made by the owner.
    settings = {
        **shared_settings(roles, "hybrid"),
        "database_pool_size": 5,
        "database_tenant_pool_size": 5,
        "admin_url": roles.admin_url,
    }
    async with _environment(roles.app_url, settings) as environment:
        yield environment


@dataclass
class Writes:
    """What the writers of one tenant were told: the rows as acknowledged, and the ids in doubt."""

    tenant: Tenant
    rows: dict[int, str]
    doubtful: set[int] = field(default_factory=set)
    changed: set[int] = field(default_factory=set)  # rows an acknowledged write changed
    acknowledged: list[float] = field(default_factory=list)  # when each acknowledged write returned
    refused: int = 0


async def _sql(env: Env, identifier: str, statement: str) -> int:
    """One statement and its commit through the app (route /sql); the status, 0 for an exception."""
    try:
        response = await env.client.post("/sql", json=[statement], headers={"X-Tenant-ID": identifier})
    except Exception:
        return 0
    return response.status_code


async def _writer(
    env: Env, writes: Writes, number: int, stop: asyncio.Event, fresh: "itertools.count[int]"
) -> None:
    """Inserts, updates and deletes of rows this writer owns (ids = number mod WRITERS)."""
    randomness = random.Random(number)  # noqa: S311 - not for secrets
    mine = [i for i in writes.rows if i % WRITERS == number]
    identifier, tenant_id = writes.tenant.identifier, writes.tenant.id
    while not stop.is_set():
        choice = randomness.random()
        if choice < 0.4 or not mine:
            row = next(fresh) * WRITERS + number
            value = f"{identifier}-new-{row}"
            statement = (
                f"INSERT INTO orders (tenant_id, id, description) VALUES ('{tenant_id}', {row}, '{value}')"  # noqa: S608
            )
            result: str | None = value
        else:
            row = mine[randomness.randrange(len(mine))]
            if choice < 0.8:
                value = f"{identifier}-upd-{randomness.randrange(10**9)}"
                statement = f"UPDATE orders SET description = '{value}' WHERE id = {row}"  # noqa: S608
                result = value
            else:
                statement = f"DELETE FROM orders WHERE id = {row}"  # noqa: S608
                result = None
        status = await _sql(env, identifier, statement)
        if status == 200:
            writes.acknowledged.append(time.perf_counter())
            writes.changed.add(row)
            if result is None:
                writes.rows.pop(row, None)
                mine.remove(row)
            else:
                writes.rows[row] = result
                if row not in mine:
                    mine.append(row)
            continue
        # Refused or failed: whether it committed is not known to the client (a 503 at BEGIN
        # did not, an error at COMMIT might have). The row is left alone from now on.
        writes.refused += 1
        writes.doubtful.add(row)
        if row in mine:
            mine.remove(row)
        await asyncio.sleep(0.005)  # as a client would, before going on


async def _stored(env: Env, identifier: str) -> dict[int, str]:
    tenant = await env.manager.get_tenant(identifier)
    async with env.manager.session(tenant) as session:
        rows = await session.execute(sa.text("SELECT id, description, tenant_id FROM orders"))
        found = {}
        for row_id, description, tenant_id in rows:
            assert tenant_id == tenant.id, (row_id, description)  # never another tenant's row
            found[row_id] = description
        return found


async def _seed(env: Env, tenant: Tenant, rows: int) -> dict[int, str]:
    async with env.manager.session(tenant) as session:
        await session.execute(sa.text("DELETE FROM orders"))
        await session.execute(
            sa.text(
                "INSERT INTO orders (tenant_id, id, description) "
                "SELECT :t, g, :p || g FROM generate_series(1, :n) g"
            ),
            {"t": tenant.id, "p": f"{tenant.identifier}-", "n": rows},
        )
        await session.commit()
    return {i: f"{tenant.identifier}-{i}" for i in range(1, rows + 1)}


@dataclass
class Measured:
    seconds: float  # the whole move
    longest_gap: float  # the longest time without an acknowledged write of the moving tenant
    writes: int
    refused: int


async def _move_under_writers(env: Env, beta: Writes, gamma: Writes, tier: str) -> Measured:
    stop = asyncio.Event()
    fresh = itertools.count(len(beta.rows) + len(gamma.rows))
    tasks = [asyncio.create_task(_writer(env, beta, n, stop, fresh)) for n in range(WRITERS)]
    tasks += [asyncio.create_task(_writer(env, gamma, n, stop, fresh)) for n in range(2)]
    try:
        await asyncio.sleep(0.3)
        count, refused = len(beta.acknowledged), beta.refused
        started = time.perf_counter()
        moved = await env.manager.move_tenant("beta", tier, app_metadata=SharedBase.metadata)
        ended = time.perf_counter()
        assert moved.tier == tier
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    during = [t for t in beta.acknowledged if started <= t <= ended]
    marks = [started, *during, ended]
    gap = max(b - a for a, b in itertools.pairwise(marks))
    measured = Measured(ended - started, gap, len(beta.acknowledged) - count, beta.refused - refused)
    print(f"move to {tier}: {measured}")  # noqa: T201
    return measured


def _check(expected: Writes, stored: dict[int, str]) -> None:
    """Every acknowledged write is in: the rows as the writers were told, apart from those in doubt."""
    sure = {i: d for i, d in expected.rows.items() if i not in expected.doubtful}
    found = {i: d for i, d in stored.items() if i not in expected.doubtful}
    assert found == sure
    assert len(expected.changed - expected.doubtful) > 50  # acknowledged writes were checked


async def _leftovers(url: str) -> list[object]:
    query = (
        "SELECT relname FROM pg_class WHERE relname LIKE 'fastapi_tenancy_move%' UNION ALL "
        "SELECT proname FROM pg_proc WHERE proname LIKE 'fastapi_tenancy_move%' UNION ALL "
        "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'fastapi_tenancy_move%'"
    )
    return await server_sql(url, query)


def _database_url(roles: Roles, name: str) -> str:
    return make_url(roles.admin_url).set(database=name).render_as_string(hide_password=False)


async def _two(env: Env, rows: int) -> tuple[Writes, Writes]:
    # gamma beside beta in the shared tables, with the same keys, written to all along.
    gamma = await env.manager.register_tenant("gamma", "Gamma", app_metadata=SharedBase.metadata, tier="rls")
    beta = await env.manager.get_tenant("beta")
    return Writes(beta, await _seed(env, beta, rows)), Writes(gamma, await _seed(env, gamma, rows))


async def test_writes_go_on_while_a_tenant_moves_into_and_out_of_the_database_tier(
    env: Env, roles: Roles
) -> None:
    beta, gamma = await _two(env, ROWS)
    prefix = env.manager.config.schema_prefix
    database = prefix + "beta"
    measured = {}
    for source, tier in (
        ("rls", "database"),
        ("database", "schema"),
        ("schema", "database"),
        ("database", "rls"),
    ):
        measured[f"{source} -> {tier}"] = m = await _move_under_writers(env, beta, gamma, tier)
        _check(beta, await _stored(env, "beta"))
        _check(gamma, await _stored(env, "gamma"))
        assert m.writes > 50, m  # the writers ran through the move
        # The writes were held for the switch only, a small part of the move.
        # Held for the whole copy (as before), it would be the copy: 65-75% of these moves.
        assert m.longest_gap < m.seconds * 0.4, m
        # Nothing of the change capture is left, where the old copy is or the new one.
        assert await _leftovers(roles.admin_url) == []
        if database in await databases(roles.admin_url, database):
            assert await _leftovers(_database_url(roles, database)) == []
        await env.manager.remove_old_copy("beta")
    print(measured)  # noqa: T201
    assert (await env.get("alpha", "/orders")).json()["orders"][0]["description"] == "alpha-1"


@pytest.mark.parametrize("stage", ["catch_up", "under_the_hold"])
async def test_a_move_that_fails_leaves_the_old_copy_serving_and_nothing_behind(
    env: Env, roles: Roles, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    beta, gamma = await _two(env, 2000)
    database = env.manager.config.schema_prefix + "beta"

    async def fail(*args: object, **kwargs: object) -> int:
        raise RuntimeError("injected")

    for tier in ("database", "schema"):  # out of rls, then out of the database tier
        with monkeypatch.context() as patch:
            if stage == "catch_up":
                patch.setattr(Capture, "catch_up", fail)
            else:
                patch.setattr(moves, "advance_sequences", fail)
            refused = beta.refused
            with pytest.raises(RuntimeError, match="injected"):
                await _move_under_writers(env, beta, gamma, tier)
            print(f"failed move to {tier} at {stage}: {beta.refused - refused} writes refused")  # noqa: T201
        _check(beta, await _stored(env, "beta"))
        _check(gamma, await _stored(env, "gamma"))
        assert await _leftovers(roles.admin_url) == []
        if tier == "database":
            assert await databases(roles.admin_url, database) == []  # the new copy is removed
            await env.manager.move_tenant("beta", "database", app_metadata=SharedBase.metadata)
            await env.manager.remove_old_copy("beta")
        else:
            assert await _leftovers(_database_url(roles, database)) == []
            schemas = f"SELECT nspname FROM pg_namespace WHERE nspname LIKE '{database}%'"  # noqa: S608
            assert await _admin_rows(roles, schemas) == []
    assert (await env.manager.get_tenant("beta")).tier == "database"


async def test_a_truncate_during_the_copy_has_the_tenant_copied_again_under_the_hold(
    env: Env, roles: Roles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    alpha = await env.manager.get_tenant("alpha")  # in its own schema
    schema = env.manager.config.schema_prefix + "alpha"
    catch_up = Capture.catch_up

    async def truncated_meanwhile(self: Capture, *args: Any) -> int:
        # The tenant empties its table while its copy is made (a write the replay cannot order).
        statements = [
            f'TRUNCATE "{schema}".orders',
            f'INSERT INTO "{schema}".orders (tenant_id, id, description) '  # noqa: S608
            f"VALUES ('{alpha.id}', 7, 'alpha-7')",
        ]
        for statement in statements:
            await server_sql(roles.owner_url, statement)
        return await catch_up(self, *args)

    monkeypatch.setattr(Capture, "catch_up", truncated_meanwhile)
    await env.manager.move_tenant("alpha", "database", app_metadata=SharedBase.metadata)
    assert await _stored(env, "alpha") == {7: "alpha-7"}
    assert "copied again under the hold" in caplog.text
    assert await _leftovers(roles.admin_url) == []


async def test_a_table_without_a_primary_key_is_moved_with_the_writes_held_throughout(
    env: Env, roles: Roles, caplog: pytest.LogCaptureFixture
) -> None:
    alpha = await env.manager.get_tenant("alpha")
    schema = env.manager.config.schema_prefix + "alpha"
    metadata = sa.MetaData()
    for table in SharedBase.metadata.sorted_tables:
        table.to_metadata(metadata)
    sa.Table("notes", metadata, sa.Column("tenant_id", sa.String(36)), sa.Column("body", sa.Text))
    await server_sql(roles.owner_url, f'CREATE TABLE "{schema}".notes (tenant_id varchar(36), body text)')
    await server_sql(roles.owner_url, f"INSERT INTO \"{schema}\".notes VALUES ('x', 'a'), ('x', 'a')")  # noqa: S608
    await env.manager.move_tenant("alpha", "database", app_metadata=metadata)
    assert "have no primary key" in caplog.text
    assert await _stored(env, "alpha") == {1: "alpha-1", 2: "alpha-2"}
    url = _database_url(roles, env.manager.config.schema_prefix + "alpha")
    assert await server_sql(url, "SELECT tenant_id || body FROM notes") == [alpha.id + "a"] * 2
    assert await _leftovers(roles.admin_url) == []


async def test_a_second_move_of_the_same_tenant_is_refused_while_the_first_runs(
    env: Env, roles: Roles, monkeypatch: pytest.MonkeyPatch
) -> None:
    catch_up = Capture.catch_up
    refused: list[str] = []

    async def another_move_meanwhile(self: Capture, *args: Any) -> int:
        # Into rls, which refuses only rows already committed there: without the move's
        # own lock it would start, and remove this move's change capture.
        if not refused:
            with pytest.raises(ProvisioningError, match="being moved already") as raised:
                await env.manager.move_tenant("beta", "rls", app_metadata=SharedBase.metadata)
            refused.append(str(raised.value))
        return await catch_up(self, *args)

    await env.manager.move_tenant("beta", "database", app_metadata=SharedBase.metadata)
    await env.manager.remove_old_copy("beta")
    monkeypatch.setattr(Capture, "catch_up", another_move_meanwhile)
    await env.manager.move_tenant("beta", "schema", app_metadata=SharedBase.metadata)
    assert refused
    assert (await env.manager.get_tenant("beta")).tier == "schema"
    assert await _stored(env, "beta") == {1: "beta-1", 3: "beta-3"}
    assert await _leftovers(roles.admin_url) == []


async def test_a_move_in_maintenance_serves_the_tenant_until_the_hold(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    catch_up = Capture.catch_up
    during_copy: list[tuple[str, int]] = []

    async def served_meanwhile(self: Capture, *args: Any) -> int:
        tenant = await env.manager.get_tenant("beta")
        write = await _sql(env, "beta", "UPDATE orders SET description = 'beta-one' WHERE id = 1")
        during_copy.append((tenant.status.value, write))
        return await catch_up(self, *args)

    monkeypatch.setattr(Capture, "catch_up", served_meanwhile)
    moved = await env.manager.move_tenant(
        "beta", "database", app_metadata=SharedBase.metadata, maintenance=True
    )
    assert during_copy[0] == ("active", 200)  # not in maintenance while copying: written to
    assert (moved.tier, (await env.manager.get_tenant("beta")).status.value) == ("database", "active")
    assert await _stored(env, "beta") == {1: "beta-one", 3: "beta-3"}  # the write made during the copy
