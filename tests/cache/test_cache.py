"""`TenantCache` on both backends: keys carry the tenant, invalidation is per tenant and
one step, and no key a user supplies can reach or widen into another tenant's entries."""

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from fastapi_tenancy import InvalidIdentifierError, Tenant, TenantResolutionError, tenant_scope
from fastapi_tenancy.cache import CacheBackend, MemoryCacheBackend, TenantCache
from fastapi_tenancy.cache.redis import RedisCacheBackend

ALPHA = Tenant(identifier="alpha", name="Alpha")
BETA = Tenant(identifier="beta", name="Beta")
# Keys a user may supply: Redis glob characters, the separator, escapes, a forged layout.
HOSTILE_KEYS = [
    "*",
    "?",
    "[a]",
    "[^a]",
    "\\",
    "\\*",
    "a*b",
    ":",
    "*:*",
    "v0:*",
    "%2A",
    "",
    " ",
    "é",
    "x" * 300,
]


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[TenantCache]:
    if request.param == "memory":
        backend: CacheBackend = MemoryCacheBackend()
    else:
        backend = RedisCacheBackend(str(request.getfixturevalue("redis_url")))
    cache = TenantCache(backend, prefix=unique)
    try:
        yield cache
    finally:
        if isinstance(backend, RedisCacheBackend):
            keys = [key async for key in backend.redis.scan_iter(match=f"{unique}:*")]
            if keys:
                await backend.redis.delete(*keys)
        await cache.close()


async def test_each_tenant_sees_only_its_own_value_for_a_key(cache: TenantCache) -> None:
    with tenant_scope(ALPHA):
        await cache.set("report", {"owner": "alpha"})
    with tenant_scope(BETA):
        assert await cache.get("report") is None
        await cache.set("report", {"owner": "beta"})
    with tenant_scope(ALPHA):
        assert await cache.get("report") == {"owner": "alpha"}
    assert await cache.get("report", tenant=BETA) == {"owner": "beta"}


async def test_no_tenant_no_cache(cache: TenantCache) -> None:
    with pytest.raises(TenantResolutionError):
        await cache.get("report")
    with pytest.raises(TenantResolutionError):
        await cache.set("report", 1)
    with pytest.raises(TenantResolutionError):
        await cache.invalidate_tenant()


async def test_invalidating_one_tenant_leaves_the_other_intact_for_hostile_keys(cache: TenantCache) -> None:
    for tenant in (ALPHA, BETA):
        for index, key in enumerate(HOSTILE_KEYS):
            await cache.set(key, [tenant.identifier, index], tenant=tenant)
    for tenant in (ALPHA, BETA):  # every key is its own entry: escaping never merges two
        for index, key in enumerate(HOSTILE_KEYS):
            assert await cache.get(key, tenant=tenant) == [tenant.identifier, index], key

    with tenant_scope(ALPHA):
        await cache.invalidate_tenant()
        assert [await cache.get(key) for key in HOSTILE_KEYS] == [None] * len(HOSTILE_KEYS)
        await cache.set("*", "fresh")  # the new generation works
        assert await cache.get("*") == "fresh"
    for index, key in enumerate(HOSTILE_KEYS):
        assert await cache.get(key, tenant=BETA) == ["beta", index], key


@pytest.mark.parametrize("cache", ["redis"], indirect=True)
async def test_stored_keys_carry_the_tenant_and_no_glob_character(cache: TenantCache, unique: str) -> None:
    assert isinstance(cache.backend, RedisCacheBackend)
    for key in HOSTILE_KEYS:
        await cache.set(key, 1, tenant=ALPHA)
    await cache.invalidate_tenant(BETA)
    stored = [key.decode() async for key in cache.backend.redis.scan_iter(match=f"{unique}:*")]
    alpha_data = f"{unique}:alpha:{ALPHA.id}:v0:"
    assert f"{unique}:beta:{BETA.id}:version" in stored
    data = [key for key in stored if not key.endswith(":version")]
    assert len(data) == len(HOSTILE_KEYS)
    for key in data:
        assert key.startswith(alpha_data), key
        assert not set(key.removeprefix(alpha_data)) & set("*?[]\\: "), key


async def test_a_slug_registered_again_never_sees_the_old_tenants_entries(cache: TenantCache) -> None:
    await cache.set("secret", "old tenant", tenant=ALPHA)
    successor = Tenant(identifier="alpha", name="Someone else")
    assert await cache.get("secret", tenant=successor) is None


async def test_get_or_set_delete_and_ttl(cache: TenantCache) -> None:
    calls: list[int] = []

    async def compute() -> int:
        calls.append(1)
        return 42

    with tenant_scope(ALPHA):
        assert await cache.get_or_set("answer", compute) == 42
        assert await cache.get_or_set("answer", compute) == 42
        assert calls == [1]
        await cache.set("none", None)
        assert await cache.get("none", default="missing") is None  # a cached None is a hit
        await cache.delete("answer")
        assert await cache.get("answer", default="missing") == "missing"
        await cache.set("brief", 1, ttl=0.05)
        await cache.set("kept", 1, ttl=None)
        await asyncio.sleep(0.3)
        assert await cache.get("brief") is None
        assert await cache.get("kept") == 1


@pytest.mark.parametrize("identifier", ["*", "a*", "a?b", "[ab]", "a\\b", "a:b", "A"])
def test_identifiers_cannot_hold_glob_characters(identifier: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        Tenant(identifier=identifier, name="x")


@pytest.mark.parametrize("prefix", ["", "a*", "a:b", "a b", "x" * 65])
def test_the_prefix_is_checked(prefix: str) -> None:
    with pytest.raises(ValueError):
        TenantCache(MemoryCacheBackend(), prefix=prefix)


async def test_the_memory_backend_is_bounded() -> None:
    cache = TenantCache(MemoryCacheBackend(max_entries=3))
    for key in "abcd":
        await cache.set(key, key, tenant=ALPHA)
    assert [await cache.get(key, tenant=ALPHA) for key in "abcd"] == [None, "b", "c", "d"]


async def test_the_redis_backend_uses_a_client_it_is_given(redis_url: str, unique: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    cache = TenantCache(RedisCacheBackend(client), prefix=unique)
    try:
        await cache.set("k", {"v": 1}, tenant=ALPHA)
        assert await cache.get("k", tenant=ALPHA) == {"v": 1}
        await cache.close()  # not ours to close
        assert await client.ping()
    finally:
        keys = [key async for key in client.scan_iter(match=f"{unique}:*")]
        await client.delete(*keys)
        await client.aclose()
