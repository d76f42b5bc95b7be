"""Cache and rate-limit keys in the real Redis never collide across tenants (checklist items
24, 27 and the key part of 49): Hypothesis draws two tenants (different slugs, or one slug
registered again) and hostile cache keys (separators, glob characters, a forged layout,
arbitrary Unicode). No stored key of one tenant equals or prefixes a key of the other,
each reads back only its own value, and invalidating or throttling one leaves the other
untouched."""

import asyncio
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastapi_tenancy import RateLimitExceededError, Tenant, TenantStatus
from fastapi_tenancy.cache import TenantCache
from fastapi_tenancy.cache.redis import RedisCacheBackend
from fastapi_tenancy.ratelimit.redis import RedisRateLimiter

from ..conftest import REDIS_URL, require_redis
from .sync import new_runner

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Slugs, including ones spelling parts of the key layout: the cache and the limiter share a
# prefix here, as they do when both follow `redis_key_prefix`.
SLUG = st.from_regex(re.compile(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?"), fullmatch=True) | st.sampled_from(
    ["ratelimit", "version", "v0", "v1", "secret"]
)
KEYS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", ":", "*", "?", "[a]", "\\", "*:*", "v0:*", ":version", "version", "%3A", "..", "/"]),
    # A key that spells out another tenant's layout (filled in below with the other's names).
    st.just("{other}"),
)


@contextmanager
def redis_keyspace() -> Iterator[tuple[asyncio.Runner, TenantCache, RedisRateLimiter, str]]:
    """A cache and a limiter (one request per minute) on the shared Redis, under a prefix of our own."""
    name = f"ft-keys-{uuid.uuid4().hex[:12]}"
    with new_runner() as runner:
        require_redis()
        cache = TenantCache(RedisCacheBackend(REDIS_URL), prefix=name, ttl=60)
        assert isinstance(cache.backend, RedisCacheBackend)
        limiter = RedisRateLimiter(cache.backend.redis, prefix=f"{name}:", requests=1, window=60)
        try:
            yield runner, cache, limiter, name
        finally:
            runner.run(_clear(cache, name))
            runner.run(cache.close())


async def _clear(cache: TenantCache, name: str) -> None:
    assert isinstance(cache.backend, RedisCacheBackend)
    keys = [key async for key in cache.backend.redis.scan_iter(match=f"{name}:*", count=1000)]
    if keys:
        await cache.backend.redis.delete(*keys)


async def _stored(cache: TenantCache, name: str) -> list[str]:
    assert isinstance(cache.backend, RedisCacheBackend)
    return [key.decode() async for key in cache.backend.redis.scan_iter(match=f"{name}:*", count=1000)]


async def _new_keys(cache: TenantCache, name: str, before: set[str]) -> set[str]:
    """The keys stored under our prefix since `before` was taken."""
    return set(await _stored(cache, name)) - before


def _apart(first: set[str], second: set[str]) -> None:
    for a in first:
        for b in second:
            assert not a.startswith(b) and not b.startswith(a), (a, b)


@pytest.mark.parametrize("same_slug", [False, True], ids=["two-slugs", "slug-registered-again"])
def test_hostile_keys_of_two_tenants_never_meet(same_slug: bool) -> None:
    with redis_keyspace() as (runner, cache, limiter, name):

        @given(
            slugs=st.tuples(SLUG, SLUG).filter(lambda pair: same_slug or pair[0] != pair[1]), data=st.data()
        )
        @FUZZ
        def probe(slugs: tuple[str, str], data: st.DataObject) -> None:
            first = Tenant(identifier=slugs[0], name="first", status=TenantStatus.ACTIVE)
            second = Tenant(
                identifier=slugs[0] if same_slug else slugs[1], name="second", status=TenantStatus.ACTIVE
            )
            keys = {}
            for tenant, other in ((first, second), (second, first)):
                key = data.draw(KEYS, label=f"key of {tenant.name}")
                keys[tenant.name] = key.replace("{other}", f"{cache.namespace(other)}:v0:secret")
            runner.run(_exercise(cache, limiter, name, first, second, keys))

        probe()


async def _exercise(
    cache: TenantCache,
    limiter: RedisRateLimiter,
    name: str,
    first: Tenant,
    second: Tenant,
    keys: dict[str, str],
) -> None:
    await _clear(cache, name)
    owned: dict[str, set[str]] = {}
    for tenant in (first, second):
        before = set(await _stored(cache, name))
        await cache.set(keys[tenant.name], [tenant.id, keys[tenant.name]], tenant=tenant)
        await cache.set("secret", [tenant.id, "secret"], tenant=tenant)
        await cache.invalidate_tenant(tenant)  # writes the version key
        await cache.set(keys[tenant.name], [tenant.id, keys[tenant.name]], tenant=tenant)
        assert await limiter.check(tenant) is not None
        owned[tenant.name] = await _new_keys(cache, name, before)  # its cache entries and limiter key
        assert owned[tenant.name], "nothing was stored"
    # No key of one tenant equals or prefixes a key of the other.
    _apart(owned["first"], owned["second"])
    for key in owned["first"] | owned["second"]:
        assert "*" not in key and "?" not in key and "[" not in key, key

    # Each reads only its own values; the one without "secret" in its current version sees none.
    for tenant in (first, second):
        assert await cache.get(keys[tenant.name], tenant=tenant) == [tenant.id, keys[tenant.name]]
        secret = await cache.get("secret", tenant=tenant)
        assert secret is None or secret[0] == tenant.id, secret

    # Invalidating the first leaves the second's entry.
    await cache.invalidate_tenant(first)
    assert await cache.get(keys["first"], tenant=first) is None
    assert await cache.get(keys["second"], tenant=second) == [second.id, keys["second"]]

    # The first is over its limit (one a minute); the second's quota is its own.
    with pytest.raises(RateLimitExceededError):
        await limiter.check(first)
    fresh = Tenant(identifier=second.identifier, name="third", status=TenantStatus.ACTIVE)
    assert await limiter.check(fresh) is not None  # the slug once more: a new key, a full quota
