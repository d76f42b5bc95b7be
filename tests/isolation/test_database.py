"""Database per tenant beyond the matrix: the connection budget (300 tenants, measured from
pg_stat_activity), safe eviction, tenants on two PostgreSQL servers, and the encryption of
tenants' own database URLs.

A second, throwaway PostgreSQL cluster is started for this module (initdb + pg_ctl as user
postgres, trust auth, a spare port, fsync off so creating databases is quick) and removed
at the end; the shared server on 5432 is never reconfigured.
"""

import asyncio
import glob
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from fastapi_tenancy import (
    ConfigurationError,
    ProvisioningError,
    TenancyConfig,
    TenancyManager,
    TenancyUnavailableError,
    Tenant,
    TenantStatus,
)
from fastapi_tenancy.encryption import URLCipher
from fastapi_tenancy.isolation import DatabaseIsolation

from ..apps import Base, Order, build_app
from ..conftest import REQUIRE_SERVICES, _free_port
from .databases import databases, dropped_afterwards, server_sql, unique_prefix

PASSWORD = "s3cret-Pw-4711"  # trust auth ignores it; it must never show up anywhere


# -- the second cluster --------------------------------------------------------------------


def _as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture(scope="module")
def second_cluster() -> Iterator[str]:
    """The server URL (maintenance database `postgres`) of a private PostgreSQL cluster."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        if REQUIRE_SERVICES:
            pytest.fail("initdb is required (TENANCY_TEST_REQUIRE_SERVICES=1): install postgresql")
        pytest.skip("initdb not found under /usr/lib/postgresql/*/bin")
    bin_dir = Path(binaries[-1]).parent
    # In memory where there is room: 300 databases are ~100k files, slow to create and
    # delete on a disk file system (minutes on a loaded machine), quick on tmpfs.
    shm = Path("/dev/shm")
    in_memory = shm.is_dir() and shutil.disk_usage(shm).free > 8 * 2**30
    workdir = Path(tempfile.mkdtemp(prefix="ft-second-pg-", dir=shm if in_memory else None))
    os.chmod(workdir, 0o777)  # the cluster runs as postgres
    data, port = workdir / "data", _free_port()
    subprocess.run(
        _as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"),
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c max_connections=100 "
        "-c fsync=off -c full_page_writes=off -c synchronous_commit=off"
    )
    pg_ctl = str(bin_dir / "pg_ctl")
    subprocess.run(
        _as_postgres(pg_ctl, "-D", str(data), "-o", options, "-l", str(workdir / "log"), "-w", "start"),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres(pg_ctl, "-D", str(data), "-m", "immediate", "stop"), capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def second_url(second_cluster: str) -> AsyncIterator[str]:
    """A fresh registry database on the second cluster, dropped after the test."""
    name = f"reg_{uuid.uuid4().hex[:10]}"
    await server_sql(second_cluster, f'CREATE DATABASE "{name}"')
    yield make_url(second_cluster).set(database=name).render_as_string(hide_password=False)
    await server_sql(second_cluster, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def app_on(url: str, **settings: object) -> AsyncIterator[tuple[TenancyManager, httpx.AsyncClient]]:
    config = TenancyConfig(database_url=url, isolation_strategy="database", **settings)  # type: ignore[arg-type]
    manager = TenancyManager(config)
    await manager.initialize()
    try:
        transport = httpx.ASGITransport(app=build_app(manager))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield manager, client
    finally:
        await manager.close()


async def _orders(client: httpx.AsyncClient, tenant: str) -> list[str]:
    response = await client.get("/orders", headers={"X-Tenant-ID": tenant})
    assert response.status_code == 200, response.text
    return [o["description"] for o in response.json()["orders"]]


async def _seed(
    manager: TenancyManager, identifier: str, rows: dict[int, str], database_url: str | None = None
) -> Tenant:
    tenant = await manager.register_tenant(
        identifier, identifier.title(), app_metadata=Base.metadata, database_url=database_url
    )
    async with manager.session(tenant) as session:
        session.add_all(Order(id=i, description=d) for i, d in rows.items())
        await session.commit()
    return tenant


# -- the connection budget -----------------------------------------------------------------


async def _connections(server: str, prefix: str) -> int:
    count = await server_sql(
        server,
        f"SELECT count(*) FROM pg_stat_activity WHERE datname LIKE '{prefix}%'",  # noqa: S608
    )
    return int(str(count[0]))


async def test_300_tenants_never_hold_more_connections_than_the_budget(
    second_cluster: str, second_url: str
) -> None:
    budget, tenants, prefix = 12, [f"t{i:03d}" for i in range(300)], unique_prefix()
    # The databases go with the cluster at the end of the module: no DROP needed.
    # 300 databases made from a template holding `orders` (one CREATE DATABASE each,
    # concurrently): provisioning through the library is timed in the next test.
    template = f"{prefix}template"
    await server_sql(second_cluster, f'CREATE DATABASE "{template}"')
    await server_sql(
        make_url(second_cluster).set(database=template).render_as_string(hide_password=False),
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, description VARCHAR(200))",
    )
    for start in range(0, len(tenants), 6):
        await asyncio.gather(
            *(
                server_sql(
                    second_cluster,
                    f'CREATE DATABASE "{prefix}{name}" TEMPLATE "{template}" STRATEGY FILE_COPY',
                )
                for name in tenants[start : start + 6]
            )
        )
    async with app_on(
        second_url,
        schema_prefix=prefix,
        database_connection_budget=budget,
        database_tenant_pool_size=2,
        max_cached_engines=100,  # fewer than the tenants: LRU eviction runs too
        database_pool_timeout=60,
    ) as (manager, client):
        for name in tenants:
            await manager.store.create(Tenant(identifier=name, name=name, status=TenantStatus.ACTIVE))
        # Databases made outside the library carry no tenant's marker: adopted, or refused.
        for start in range(0, len(tenants), budget):
            await asyncio.gather(*(manager.adopt_storage(name) for name in tenants[start : start + budget]))
        samples: list[int] = []
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                samples.append(await _connections(second_cluster, prefix))
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        try:
            # Every tenant at once, and 4 new tenants provisioned meanwhile.
            started = time.perf_counter()
            results = await asyncio.gather(
                *(client.get("/orders", headers={"X-Tenant-ID": name}) for name in tenants),
                *(manager.register_tenant(f"new{i}", "New", app_metadata=Base.metadata) for i in range(4)),
            )
        finally:
            done.set()
            await sampler
        responses = [r for r in results if isinstance(r, httpx.Response)]
        elapsed = time.perf_counter() - started
        assert [r.status_code for r in responses] == [200] * 300
        assert all(r.json()["orders"] == [] for r in responses)
        isolation = manager.isolation
        assert isinstance(isolation, DatabaseIsolation)
        print(
            f"\n300 tenants, budget {budget}: at most {max(samples)} connections in pg_stat_activity "
            f"({len(samples)} samples), peak {isolation.budget.peak} counted by the budget, "
            f"{isolation.budget.opened} opened, {elapsed:.1f}s for 300 requests + 4 provisionings"
        )
        assert 1 < max(samples) <= budget
        assert isolation.budget.peak <= budget
        assert len(isolation.engines) <= 100 + budget  # engines in use are never evicted
        assert await _connections(second_cluster, prefix) <= budget


async def test_provisioning_creates_a_database_and_counts_against_the_budget(second_url: str) -> None:
    async with (
        dropped_afterwards(second_url) as prefix,
        app_on(
            second_url, schema_prefix=prefix, database_connection_budget=3, database_tenant_pool_size=1
        ) as (
            manager,
            client,
        ),
    ):
        started = time.perf_counter()
        await asyncio.gather(*(_seed(manager, f"p{i}", {1: f"p{i}-1"}) for i in range(8)))
        per_tenant = (time.perf_counter() - started) / 8
        print(f"\nprovisioning: {per_tenant * 1000:.0f} ms per tenant (8 concurrently, budget 3)")
        assert await databases(second_url, prefix) == [f"{prefix}p{i}" for i in range(8)]
        assert [await _orders(client, f"p{i}") for i in range(8)] == [[f"p{i}-1"] for i in range(8)]
        isolation = manager.isolation
        assert isinstance(isolation, DatabaseIsolation)
        assert isolation.budget.peak <= 3
        await manager.delete_tenant("p0", destroy_data=True)
        assert f"{prefix}p0" not in await databases(second_url, prefix)


async def test_an_exhausted_budget_is_a_clear_503_and_recovers(second_url: str) -> None:
    async with (
        dropped_afterwards(second_url) as prefix,
        app_on(
            second_url,
            schema_prefix=prefix,
            database_connection_budget=2,
            database_tenant_pool_size=1,
            database_pool_timeout=0.5,
        ) as (manager, client),
    ):
        tenants = [await _seed(manager, name, {1: name}) for name in ("a", "b", "c")]
        async with manager.session(tenants[0]) as first, manager.session(tenants[1]) as second:
            await first.execute(sa.text("SELECT 1"))  # both connections of the budget checked out
            await second.execute(sa.text("SELECT 1"))
            response = await client.get("/orders", headers={"X-Tenant-ID": "c"})
            assert response.status_code == 503, response.text
            assert response.json() == {"detail": "Tenancy backend unavailable"}
            assert await first.scalar(sa.text("SELECT count(*) FROM orders")) == 1  # untouched
        assert await _orders(client, "c") == ["c"]  # idle connections of a and b are reclaimed


async def test_concurrent_first_requests_make_one_engine_and_eviction_spares_busy_ones(
    second_url: str,
) -> None:
    async with (
        dropped_afterwards(second_url) as prefix,
        app_on(second_url, schema_prefix=prefix, max_cached_engines=1, database_tenant_pool_size=1) as (
            manager,
            client,
        ),
    ):
        alpha = await _seed(manager, "alpha", {1: "alpha-1"})
        await _seed(manager, "beta", {1: "beta-1"})
        isolation = manager.isolation
        assert isinstance(isolation, DatabaseIsolation)
        await isolation.engines.close()
        sessions = await asyncio.gather(*(isolation.session(alpha) for _ in range(50)))
        assert len({id(s.bind) for s in sessions}) == 1
        async with manager.session(alpha) as held:
            await held.execute(sa.text("SELECT 1"))  # alpha's only connection is checked out
            assert await _orders(client, "beta") == ["beta-1"]  # over the limit of one engine
            assert alpha.id in isolation.engines, "never evicted under a checked-out connection"
            assert await held.scalar(sa.text("SELECT description FROM orders")) == "alpha-1"
        await _seed(manager, "gamma", {})
        assert await _orders(client, "gamma") == []
        assert len(isolation.engines) == 1  # idle alpha and beta were evicted
        assert await _orders(client, "alpha") == ["alpha-1"]  # and alpha comes back


# -- tenants on two servers ----------------------------------------------------------------


async def test_tenants_on_two_postgres_servers_are_served_side_by_side(
    postgres_url: str, second_cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [URLCipher.generate_key()]
    second_server = make_url(second_cluster).set(database="postgres").render_as_string(hide_password=False)
    caplog.set_level(logging.DEBUG)
    async with dropped_afterwards(postgres_url) as prefix, dropped_afterwards(second_cluster, prefix):
        async with app_on(postgres_url, schema_prefix=prefix, encryption_keys=keys) as (manager, client):
            await _seed(manager, "alpha", {1: "alpha-on-first", 2: "alpha-2"})
            beta = await _seed(manager, "beta", {1: "beta-on-second"}, database_url=second_server)
            for _ in range(3):
                assert await _orders(client, "alpha") == ["alpha-on-first", "alpha-2"]
                assert await _orders(client, "beta") == ["beta-on-second"]
            assert await databases(postgres_url, prefix) == [f"{prefix}alpha"]
            assert await databases(second_cluster, prefix) == [f"{prefix}beta"]

            # At rest: ciphertext only, in the registry row and on the Tenant.
            (stored,) = await server_sql(
                postgres_url,
                "SELECT encrypted_database_url FROM public.tenants WHERE identifier = 'beta'",
            )
            assert beta.encrypted_database_url == stored
            assert isinstance(stored, str) and PASSWORD not in stored and "127.0.0.1" not in stored
            assert manager.cipher is not None and manager.cipher.decrypt(stored) == second_server
            for text in (
                repr(beta),
                str(beta),
                repr(await manager.get_tenant("beta")),
                repr(manager.isolation),
            ):
                assert PASSWORD not in text and stored not in text

            await manager.delete_tenant("beta", destroy_data=True)
            assert await databases(second_cluster, prefix) == []
            assert await databases(postgres_url, prefix) == [f"{prefix}alpha"]
    assert caplog.records, "the test logged at DEBUG"
    assert PASSWORD not in caplog.text


async def test_an_unreachable_tenant_server_never_leaks_its_url(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [URLCipher.generate_key()]
    dead = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{_free_port()}/postgres"
    caplog.set_level(logging.DEBUG)
    async with (
        dropped_afterwards(postgres_url) as prefix,
        app_on(postgres_url, schema_prefix=prefix, encryption_keys=keys) as (manager, client),
    ):
        with pytest.raises(TenancyUnavailableError) as raised:  # a 503: the server may come back
            await manager.register_tenant("gone", "Gone", app_metadata=Base.metadata, database_url=dead)
        assert await manager.store.get_by_identifier("gone") is None
        # A tenant whose server goes away after registration: a clear 503, no URL.
        token = manager.cipher.encrypt(dead) if manager.cipher else ""
        await manager.store.create(
            Tenant(identifier="lost", name="Lost", status=TenantStatus.ACTIVE, encrypted_database_url=token)
        )
        response = await client.get("/orders", headers={"X-Tenant-ID": "lost"})
        assert response.status_code == 503, response.text
    for text in (str(raised.value), repr(raised.value), raised.value.detail, response.text, caplog.text):
        assert PASSWORD not in text


async def test_database_urls_need_keys_and_a_strategy_that_uses_them(sqlite_url: str) -> None:
    manager = TenancyManager(TenancyConfig(database_url=sqlite_url))
    await manager.initialize()
    try:
        with pytest.raises(ConfigurationError, match="encryption_keys"):
            await manager.register_tenant("a", "A", database_url="postgresql://u:p@h/db")
        assert await manager.store.get_by_identifier("a") is None
    finally:
        await manager.close()
    keyed = TenancyConfig(
        database_url=sqlite_url,
        isolation_strategy="database",
        encryption_keys=[URLCipher.generate_key()],  # type: ignore[list-item]
    )
    manager = TenancyManager(keyed)
    await manager.initialize()
    try:
        with pytest.raises(ConfigurationError, match="one server"):
            await manager.register_tenant("a", "A", database_url=f"postgresql://u:{PASSWORD}@h/db")
        with pytest.raises(ConfigurationError, match="database_url") as raised:
            await manager.register_tenant("a", "A", database_url=f"oracle://u:{PASSWORD}@h/db")
        assert PASSWORD not in str(raised.value)
        assert await manager.store.count() == 0
    finally:
        await manager.close()


# -- key rotation --------------------------------------------------------------------------


async def test_key_rotation_reencrypts_every_url_and_the_old_key_can_go(
    postgres_url: str, second_cluster: str
) -> None:
    old, new = URLCipher.generate_key(), URLCipher.generate_key()
    second_server = make_url(second_cluster).set(database="postgres").render_as_string(hide_password=False)
    async with dropped_afterwards(postgres_url) as prefix, dropped_afterwards(second_cluster, prefix):
        settings = {"schema_prefix": prefix}
        async with app_on(postgres_url, encryption_keys=[old], **settings) as (manager, client):
            before = await _seed(manager, "beta", {1: "beta-1"}, database_url=second_server)
            await _seed(manager, "alpha", {1: "alpha-1"})
        async with app_on(postgres_url, encryption_keys=[new, old], **settings) as (manager, client):
            assert await _orders(client, "beta") == ["beta-1"]  # old tokens still open
            assert await manager.rotate_encryption_keys() == 1  # alpha has no URL
            assert await manager.rotate_encryption_keys() == 0
            after = await manager.get_tenant("beta")
            assert after.encrypted_database_url not in (None, before.encrypted_database_url)
        async with app_on(postgres_url, encryption_keys=[new], **settings) as (manager, client):
            assert await _orders(client, "beta") == ["beta-1"]  # the old key is gone
        async with app_on(postgres_url, encryption_keys=[old], **settings) as (manager, client):
            with pytest.raises(ConfigurationError, match="cannot be decrypted"):
                async with manager.session(after):
                    pass
        async with app_on(postgres_url, encryption_keys=[new], **settings) as (manager, _client):
            await manager.delete_tenant("beta", destroy_data=True)
        assert await databases(second_cluster, prefix) == []


def test_the_cipher_refuses_bad_keys_without_repeating_them() -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        URLCipher([])
    with pytest.raises(ConfigurationError, match=r"encryption_keys\[1\]") as raised:
        URLCipher([URLCipher.generate_key(), "not-a-key-" + PASSWORD])
    assert PASSWORD not in str(raised.value)
    cipher = URLCipher([URLCipher.generate_key()])
    token = cipher.encrypt("postgresql://u:p@h/db")
    assert cipher.decrypt(token) == "postgresql://u:p@h/db" and cipher.is_current(token)
    with pytest.raises(ConfigurationError, match="cannot be decrypted"):
        URLCipher([URLCipher.generate_key()]).decrypt(token)


# -- behind PgBouncer ----------------------------------------------------------------------


async def test_database_per_tenant_through_pgbouncer(pgbouncer_url: str, postgres_url: str) -> None:
    async with (
        dropped_afterwards(postgres_url) as prefix,
        app_on(pgbouncer_url, schema_prefix=prefix, database_pgbouncer=True) as (manager, client),
    ):
        await _seed(manager, "alpha", {1: "alpha-1"})
        await _seed(manager, "beta", {1: "beta-1"})
        results = await asyncio.gather(*(_orders(client, t) for t in ["alpha", "beta"] * 20))
        assert results == [["alpha-1"], ["beta-1"]] * 20
        await server_sql(postgres_url, f'CREATE DATABASE "{prefix}gamma"')
        with pytest.raises(ProvisioningError, match="already exists"):
            await manager.register_tenant("gamma", "Gamma", app_metadata=Base.metadata)


# -- MySQL/MariaDB -------------------------------------------------------------------------


async def test_mysql_tenant_databases_hold_any_text(mysql_url: str) -> None:
    # Connections whose server default is latin1, as on many installed servers.
    latin1 = make_url(mysql_url).update_query_dict({"init_command": "SET character_set_server = 'latin1'"})
    async with (
        dropped_afterwards(mysql_url) as prefix,
        app_on(latin1.render_as_string(hide_password=False), schema_prefix=prefix) as (manager, client),
    ):
        await _seed(manager, "emoji", {1: "Grüße 🎉"})
        assert await _orders(client, "emoji") == ["Grüße 🎉"]
        charset = await server_sql(
            mysql_url,
            "SELECT default_character_set_name FROM information_schema.schemata "  # noqa: S608
            f"WHERE schema_name = '{prefix}emoji'",
        )
        assert charset == ["utf8mb4"]


async def test_doctor_finds_a_tenant_database_that_went_missing(postgres_url: str) -> None:
    from fastapi_tenancy.doctor import run_checks

    async with dropped_afterwards(postgres_url) as prefix:
        config = TenancyConfig(database_url=postgres_url, isolation_strategy="database", schema_prefix=prefix)
        manager = TenancyManager(config)
        await manager.initialize()
        try:
            await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
            checks = {c.name: c for c in await run_checks(manager)}
            assert checks["tenant storage"].status == "ok", checks["tenant storage"].detail
            await manager.isolation.close()  # its pool holds the database open
            await server_sql(postgres_url, f'DROP DATABASE "{prefix}acme" WITH (FORCE)')
            checks = {c.name: c for c in await run_checks(manager)}
            assert checks["tenant storage"].status == "fail"
            assert "acme (database)" in checks["tenant storage"].detail
        finally:
            await manager.close()
