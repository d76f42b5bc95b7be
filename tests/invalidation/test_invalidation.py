"""Cross-process invalidation in one process: two managers, as two workers would be."""

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager, TenantStatus
from fastapi_tenancy.invalidation.postgres import PostgresInvalidation
from fastapi_tenancy.invalidation.redis import RedisInvalidation

from ..servers import OwnRedis, poll


@pytest.fixture
async def managers() -> AsyncIterator[list[TenancyManager]]:
    started: list[TenancyManager] = []
    yield started
    for manager in started:
        await manager.close()


async def _pair(started: list[TenancyManager], **settings: object) -> tuple[TenancyManager, TenancyManager]:
    pair = []
    for _ in range(2):
        manager = TenancyManager(
            TenancyConfig(cache_ttl=300, database_pool_size=2, database_max_overflow=0, **settings)  # type: ignore[arg-type]
        )
        started.append(manager)
        await manager.initialize()
        pair.append(manager)
    return pair[0], pair[1]


async def _status(manager: TenancyManager, slug: str) -> TenantStatus | None:
    tenant = await manager.lookup.get(slug)
    return None if tenant is None else tenant.status


@pytest.mark.parametrize("channel", ["redis", "postgres"])
async def test_every_change_reaches_the_other_process(
    channel: str, postgres_url: str, redis_url: str, redis_prefix: str, managers: list[TenancyManager]
) -> None:
    settings: dict[str, object] = {"database_url": postgres_url}
    if channel == "redis":
        settings.update(redis_url=redis_url, redis_key_prefix=redis_prefix)
    admin, worker = await _pair(managers, **settings)
    expected = RedisInvalidation if channel == "redis" else PostgresInvalidation
    assert isinstance(worker.invalidation, expected)
    assert await _status(worker, "acme") is None  # now in the worker's negative cache
    await admin.register_tenant("acme", "Acme")
    assert await poll(lambda: _has_status(worker, "acme", TenantStatus.ACTIVE), within=1.0)
    changes: list[tuple[Callable[[str], Awaitable[object]], TenantStatus]] = [
        (admin.suspend_tenant, TenantStatus.SUSPENDED),
        (admin.activate_tenant, TenantStatus.ACTIVE),
        (admin.delete_tenant, TenantStatus.DELETED),
    ]
    for change, status in changes:
        await change("acme")
        assert await poll(lambda s=status: _has_status(worker, "acme", s), within=1.0), status  # type: ignore[misc]
    await admin.delete_tenant("acme", destroy_data=True)
    assert await poll(lambda: _has_status(worker, "acme", None), within=1.0)


@pytest.mark.parametrize("channel", ["redis", "postgres"])
async def test_every_domain_change_reaches_the_other_process(
    channel: str, postgres_url: str, redis_url: str, redis_prefix: str, managers: list[TenancyManager]
) -> None:
    settings: dict[str, object] = {"database_url": postgres_url, "resolution_strategy": "domain"}
    if channel == "redis":
        settings.update(redis_url=redis_url, redis_key_prefix=redis_prefix)
    admin, worker = await _pair(managers, **settings)
    await admin.register_tenant("acme", "Acme")
    await admin.register_tenant("globex", "Globex")
    assert await _holder(worker, "acme.com") is None  # now in the worker's negative cache
    assert await worker.lookup.domains_of("acme") == ()
    await admin.add_domain("acme", "acme.com", primary=True)
    assert await poll(lambda: _holds(worker, "acme.com", "acme"), within=1.0)
    assert await poll(lambda: _primary(worker, "acme", "acme.com"), within=1.0)
    await admin.remove_domain("acme", "acme.com")
    assert await poll(lambda: _holds(worker, "acme.com", None), within=1.0)
    assert await poll(lambda: _primary(worker, "acme", None), within=1.0)
    await admin.add_domain("globex", "acme.com")
    assert await poll(lambda: _holds(worker, "acme.com", "globex"), within=1.0)
    # A purge takes the tenant's domains along, in every worker.
    await admin.delete_tenant("globex", destroy_data=True)
    assert await poll(lambda: _holds(worker, "acme.com", None), within=1.0)


async def _holder(manager: TenancyManager, name: str) -> str | None:
    tenant = await manager.lookup.get_by_domain(name)
    return None if tenant is None else tenant.identifier


async def _holds(manager: TenancyManager, name: str, identifier: str | None) -> bool:
    return await _holder(manager, name) == identifier


async def _primary(manager: TenancyManager, slug: str, name: str | None) -> bool:
    domains = await manager.lookup.domains_of(slug)
    return next((d.name for d in domains if d.primary), None) == name


async def _has_status(manager: TenancyManager, slug: str, status: TenantStatus | None) -> bool:
    return await _status(manager, slug) == status


async def test_a_worker_that_lost_redis_drops_its_cache(
    postgres_url: str, own_redis: OwnRedis, managers: list[TenancyManager]
) -> None:
    admin, worker = await _pair(
        managers, database_url=postgres_url, redis_url=own_redis.url, redis_timeout=0.5
    )
    assert worker.invalidation is not None
    await admin.register_tenant("acme", "Acme")
    await worker.lookup.get("acme")
    connected = worker.invalidation.reconnects
    await own_redis.kill()
    assert await poll(lambda: _empty(worker), within=1.0)
    # While Redis is down, nothing stays cached for longer than the retry interval.
    await worker.lookup.get("acme")
    assert await poll(lambda: _empty(worker), within=1.0)
    await own_redis.start()
    assert await poll(lambda: _reconnected(worker, connected), within=3.0)
    await admin.suspend_tenant("acme")
    assert await poll(lambda: _has_status(worker, "acme", TenantStatus.SUSPENDED), within=1.0)


async def test_a_worker_whose_listen_connection_died_drops_its_cache(
    postgres_url: str, managers: list[TenancyManager]
) -> None:
    admin, worker = await _pair(managers, database_url=postgres_url)
    assert worker.invalidation is not None
    await admin.register_tenant("acme", "Acme")
    connected = worker.invalidation.reconnects
    await worker.lookup.get("acme")
    started = time.monotonic()
    url = make_url(postgres_url)
    conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database="postgres")
    try:
        # Only the listeners of this test's own database.
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name = 'fastapi-tenancy-invalidation'",
            url.database,
        )
    finally:
        await conn.close()
    assert killed == 2  # the admin's and the worker's
    assert await poll(lambda: _empty(worker), within=1.0)
    assert await poll(lambda: _reconnected(worker, connected), within=3.0)
    assert time.monotonic() - started < 3
    await admin.suspend_tenant("acme")
    assert await poll(lambda: _has_status(worker, "acme", TenantStatus.SUSPENDED), within=1.0)


async def _empty(manager: TenancyManager) -> bool:
    return len(manager.lookup) == 0


async def _reconnected(manager: TenancyManager, before: int) -> bool:
    assert manager.invalidation is not None
    return manager.invalidation.reconnects > before


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"database_url": "sqlite:///x.db"}, None),
        ({"database_url": "sqlite:///x.db", "redis_url": "redis://cache:6379/0"}, RedisInvalidation),
        ({"database_url": "postgresql://app@db/app"}, PostgresInvalidation),
        ({"database_url": "postgresql://app@db/app", "redis_url": "redis://cache:6379/0"}, RedisInvalidation),
        # LISTEN needs a session; PgBouncer in transaction mode has none to give.
        ({"database_url": "postgresql://app@db/app", "database_pgbouncer": True}, None),
    ],
    ids=["sqlite", "sqlite-redis", "postgres", "postgres-redis", "pgbouncer"],
)
async def test_the_channel_follows_the_config(
    settings: dict[str, object], expected: type | None, caplog: pytest.LogCaptureFixture
) -> None:
    manager = TenancyManager(TenancyConfig(**settings))  # type: ignore[arg-type]
    try:
        if expected is None:
            assert manager.invalidation is None
        else:
            assert isinstance(manager.invalidation, expected)
        assert ("no cross-worker cache invalidation" in caplog.text) == bool(
            settings.get("database_pgbouncer")
        )
    finally:
        await manager.close()
