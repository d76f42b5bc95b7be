"""The registry records its invalidation channel; a process configured for another refuses to start.

Each manager stands for a process of one deployment (a worker, the CLI, a job runner):
they share the registry (PostgreSQL, SQLite or Redis) and nothing else.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from fastapi_tenancy import ConfigurationError, TenancyConfig, TenancyManager, TenantStatus
from fastapi_tenancy.doctor import CheckResult, check_invalidation_channel
from fastapi_tenancy.invalidation.base import NO_CHANNEL, ChannelRecord
from fastapi_tenancy.invalidation.record import check_channel, read_channel, record_channel
from fastapi_tenancy.invalidation.redis import RedisInvalidation
from fastapi_tenancy.storage.redis import RedisTenantStore

from ..servers import OwnRedis, poll

REGISTRIES = ["postgres", "sqlite", "redis"]


@dataclass
class Deployment:
    """Managers sharing one registry, as the processes of a deployment do."""

    kind: str
    database_url: str
    redis_url: str
    registry_prefix: str
    started: list[TenancyManager] = field(default_factory=list)

    def manager(self, **settings: Any) -> TenancyManager:
        config = TenancyConfig(
            database_url=self.database_url, database_pool_size=2, database_max_overflow=0, **settings
        )
        # A store of its own per manager, as each process has.
        store = (
            RedisTenantStore(self.redis_url, prefix=self.registry_prefix) if self.kind == "redis" else None
        )
        manager = TenancyManager(config, store)
        self.started.append(manager)
        return manager

    async def start(self, **settings: Any) -> TenancyManager:
        manager = self.manager(**settings)
        await manager.initialize()
        return manager


def _deployment(request: pytest.FixtureRequest, kind: str, database: str = "app.db") -> Deployment:
    redis_url = str(request.getfixturevalue("redis_url"))
    if kind == "postgres":
        database_url = str(request.getfixturevalue("postgres_url"))
    else:
        database_url = str(request.getfixturevalue("sqlite_url")).replace("app.db", database)
    # The Redis registry's keys apart from the channel's, under a prefix of the test's own.
    registry_prefix = f"{request.getfixturevalue('redis_prefix')}registry:"
    return Deployment(kind, database_url, redis_url, registry_prefix)


# Synchronous, to ask for the async server fixtures by name (as the store contract does).
@pytest.fixture(params=REGISTRIES)
def unstarted(request: pytest.FixtureRequest) -> Deployment:
    return _deployment(request, request.param)


@pytest.fixture
def unstarted_other(request: pytest.FixtureRequest) -> Deployment:
    return _deployment(request, "sqlite", "other.db")


async def _closing(deployment: Deployment) -> AsyncIterator[Deployment]:
    yield deployment
    for manager in deployment.started:
        await manager.close()


@pytest.fixture
async def deployment(unstarted: Deployment) -> AsyncIterator[Deployment]:
    """Processes of one deployment, over each kind of registry."""
    async for value in _closing(unstarted):
        yield value


@pytest.fixture
async def other_deployment(unstarted_other: Deployment) -> AsyncIterator[Deployment]:
    """Another deployment, with a registry of its own (a SQLite file)."""
    async for value in _closing(unstarted_other):
        yield value


def _redis(redis_url: str, redis_prefix: str) -> dict[str, str]:
    return {"redis_url": redis_url, "redis_key_prefix": redis_prefix}


async def test_a_process_without_redis_url_is_refused_where_the_workers_use_redis(
    deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    worker = await deployment.start(**_redis(redis_url, redis_prefix))
    await worker.register_tenant("acme", "Acme")
    cli = deployment.manager()  # the operator's shell: TENANCY_REDIS_URL forgotten
    with pytest.raises(ConfigurationError) as refused:
        await cli.initialize()
    message = str(refused.value)
    assert isinstance(worker.invalidation, RedisInvalidation)
    where = worker.invalidation.where
    assert where == redis_url  # 127.0.0.1:6379/0: the server, never a password
    assert f"this registry's processes use Redis pub/sub (redis_url={where}, " in message
    assert (
        f"Fix: set redis_url (TENANCY_REDIS_URL) to {where} and redis_key_prefix "
        f"(TENANCY_REDIS_KEY_PREFIX) to {redis_prefix!r}."
    ) in message
    assert "run `fastapi-tenancy invalidation record` with this configuration" in message
    assert not cli.initialized
    # Configured like the workers, the same command starts.
    fixed = await deployment.start(**_redis(redis_url, redis_prefix))
    await fixed.suspend_tenant("acme")
    assert await poll(lambda: _has_status(worker, "acme", TenantStatus.SUSPENDED), within=1.0)


async def _has_status(manager: TenancyManager, slug: str, status: TenantStatus) -> bool:
    tenant = await manager.lookup.get(slug)
    return tenant is not None and tenant.status is status


async def test_processes_configured_alike_start_and_hear_each_other(
    deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    first = await deployment.start(**_redis(redis_url, redis_prefix))
    # The same Redis under another name (a tunnel, a service name): the registry's mark in
    # the server, not the URL, says it is the same.
    alias = redis_url.replace("127.0.0.1", "localhost")
    assert alias != redis_url
    second = await deployment.start(**_redis(alias, redis_prefix))
    await first.register_tenant("acme", "Acme")
    assert await second.lookup.get("acme") is not None
    await second.suspend_tenant("acme")
    assert await poll(lambda: _has_status(first, "acme", TenantStatus.SUSPENDED), within=1.0)
    recorded = await read_channel(first.store)
    assert recorded is not None and recorded.kind == "redis" and recorded.where == redis_url


async def _race(managers: list[TenancyManager]) -> list[ChannelRecord | BaseException]:
    """The channel check of `initialize()`, run by every manager at once."""
    for manager in managers:
        await manager.store.initialize()  # the tables: the race here is the record's
    return await asyncio.gather(
        *(check_channel(m.store, m.invalidation) for m in managers), return_exceptions=True
    )


async def test_processes_starting_at_once_agree_on_one_record(
    deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    results = await _race([deployment.manager(**_redis(redis_url, redis_prefix)) for _ in range(4)])
    assert all(isinstance(r, ChannelRecord) for r in results), results
    assert len({r.token for r in results if isinstance(r, ChannelRecord)}) == 1


async def test_of_two_first_processes_configured_differently_one_is_refused(
    deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    results = await _race([deployment.manager(**_redis(redis_url, redis_prefix)), deployment.manager()])
    refused = [r for r in results if isinstance(r, ConfigurationError)]
    assert len(refused) == 1, results


async def test_another_key_prefix_is_refused(
    deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    await deployment.start(**_redis(redis_url, redis_prefix))
    with pytest.raises(ConfigurationError, match="Fix: set redis_key_prefix") as refused:
        await deployment.start(**_redis(redis_url, f"{redis_prefix}other:"))
    assert f"(TENANCY_REDIS_KEY_PREFIX) to {redis_prefix!r}." in str(refused.value)


async def test_another_redis_server_is_refused(
    deployment: Deployment, redis_url: str, redis_prefix: str, own_redis: OwnRedis
) -> None:
    await deployment.start(**_redis(redis_url, redis_prefix))
    with pytest.raises(ConfigurationError) as refused:
        await deployment.start(**_redis(own_redis.url, redis_prefix))
    message = str(refused.value)
    assert f"this process reaches Redis at {own_redis.url}, which holds no mark of this registry" in message
    assert f"Fix: set redis_url (TENANCY_REDIS_URL) to the Redis at {redis_url}." in message


async def test_two_deployments_sharing_a_key_prefix_are_told_apart(
    deployment: Deployment, other_deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    await deployment.start(**_redis(redis_url, redis_prefix))
    # Another registry, the same Redis and prefix: its invalidations and rate limits
    # would mix with the first one's.
    with pytest.raises(ConfigurationError, match="carries .* for another registry") as refused:
        await other_deployment.start(**_redis(redis_url, redis_prefix))
    assert "give each deployment its own redis_key_prefix (TENANCY_REDIS_KEY_PREFIX)" in str(refused.value)
    # Refused before anything was recorded: with a prefix of its own, it starts.
    await other_deployment.start(**_redis(redis_url, f"{redis_prefix}other:"))


async def test_a_lost_mark_is_put_back_by_a_process_that_reaches_the_recorded_server(
    deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    first = await deployment.start(**_redis(redis_url, redis_prefix))
    assert isinstance(first.invalidation, RedisInvalidation)
    key = first.invalidation.registry_key
    await first.redis.delete(key)  # a restart without persistence, an eviction
    alias = redis_url.replace("127.0.0.1", "localhost")
    with pytest.raises(ConfigurationError, match="holds no mark of this registry"):
        await deployment.start(**_redis(alias, redis_prefix))  # cannot tell: refused
    await deployment.start(**_redis(redis_url, redis_prefix))  # the recorded address: puts it back
    assert await first.redis.get(key) is not None
    await deployment.start(**_redis(alias, redis_prefix))


async def test_a_redis_process_is_refused_where_the_workers_use_listen_notify_or_nothing(
    deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    await deployment.start()
    recorded = await read_channel(deployment.started[0].store)
    assert recorded is not None
    expected = "postgres" if deployment.kind == "postgres" else "none"
    assert recorded.kind == expected
    with pytest.raises(ConfigurationError, match=r"Fix: unset redis_url \(TENANCY_REDIS_URL\)"):
        await deployment.start(**_redis(redis_url, redis_prefix))


async def test_moving_to_another_channel_is_a_deliberate_step(
    deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    old_worker = await deployment.start()
    mover = deployment.manager(**_redis(redis_url, redis_prefix))
    old, new = await record_channel(mover.store, mover.invalidation)
    assert old is not None and old.kind in ("postgres", "none")
    assert new.kind == "redis" and new.recorded_by
    # From now on the new configuration starts and the old one is refused.
    new_worker = await deployment.start(**_redis(redis_url, redis_prefix))
    with pytest.raises(ConfigurationError, match="set redis_url"):
        await deployment.start()
    # Processes that were running keep their channel until they restart.
    assert old_worker.initialized and new_worker.initialized


async def test_a_redis_outage_at_startup_does_not_stop_a_process(
    deployment: Deployment, own_redis: OwnRedis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = {**_redis(own_redis.url, redis_prefix), "redis_timeout": 0.3}
    await deployment.start(**settings)
    await own_redis.kill()
    # The channel is the right one (the registry says so); its server cannot be asked,
    # and the listener drops the cache until it is back, as it would at any other time.
    with caplog.at_level(logging.WARNING, logger="fastapi_tenancy"):
        late = await deployment.start(**settings)
    assert late.initialized
    assert f"could not check that {own_redis.url} is this registry's Redis" in caplog.text


async def _doctor(manager: TenancyManager) -> CheckResult:
    result = await check_invalidation_channel(manager)
    assert isinstance(result, CheckResult)
    return result


async def test_doctor_reports_the_record_without_writing_it(
    deployment: Deployment, redis_url: str, redis_prefix: str
) -> None:
    unstarted = deployment.manager(**_redis(redis_url, redis_prefix))
    await unstarted.store.initialize()
    result = await _doctor(unstarted)
    assert (result.status, result.detail.split(":")[0]) == ("ok", "none recorded yet")
    assert await read_channel(unstarted.store) is None  # doctor wrote nothing
    await deployment.start()
    result = await _doctor(unstarted)
    assert result.status == "fail"
    assert "Fix: unset redis_url (TENANCY_REDIS_URL)" in result.detail
    result = await _doctor(deployment.manager())
    assert result.status == "ok" and "recorded" in result.detail


def test_the_record_names_no_secret() -> None:
    client = Redis.from_url("redis://admin:s3cret@cache.internal:6380/2")
    record = RedisInvalidation(client, prefix="app:").record()
    assert record.where == "redis://cache.internal:6380/2"
    assert "s3cret" not in record.dumps() and "admin" not in record.dumps()
    assert (
        record.describe()
        == "Redis pub/sub (redis_url=redis://cache.internal:6380/2, redis_key_prefix='app:')"
    )
    assert RedisInvalidation(Redis.from_url("rediss://h/1")).where == "rediss://h:6379/1"
    assert (
        RedisInvalidation(Redis.from_url("unix:///run/redis.sock?db=3")).where
        == "unix:///run/redis.sock?db=3"
    )


async def test_the_listen_notify_record_masks_the_password(postgres_url: str) -> None:
    # The test server trusts local connections, so any password is accepted.
    url = postgres_url.replace("postgres@", "postgres:s3cret@")
    assert "s3cret" in url
    manager = TenancyManager(TenancyConfig(database_url=url, database_pool_size=2, database_max_overflow=0))
    try:
        await manager.initialize()
        recorded = await read_channel(manager.store)
        assert recorded is not None and recorded.kind == "postgres"
        assert "s3cret" not in recorded.dumps() and "***" in recorded.where
    finally:
        await manager.close()


def test_a_record_from_a_newer_version_agrees_with_no_channel() -> None:
    text = '{"kind": "nats", "channel": "x", "where": "nats://n", "future": 1}'
    record = ChannelRecord.loads(text)
    assert record.kind == "nats"  # type: ignore[comparison-overlap]
    assert not record.same_channel(NO_CHANNEL)
    assert ChannelRecord.loads(record.dumps()) == record
