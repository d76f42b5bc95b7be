"""RedisRateLimiter against the real Redis: atomic under concurrency, exact Retry-After, outages."""

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from fastapi_tenancy import RateLimitExceededError, TenancyUnavailableError, Tenant, TenantStatus
from fastapi_tenancy.ratelimit.redis import _GCRA, RedisRateLimiter

from ..servers import OwnRedis, free_port


def _tenant(slug: str = "acme") -> Tenant:
    return Tenant(identifier=slug, name=slug, status=TenantStatus.ACTIVE)


@pytest.fixture
async def limiter(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisRateLimiter]:
    limiter = RedisRateLimiter(redis_url, prefix=redis_prefix, requests=10, window=60)
    yield limiter
    await limiter.close()


async def test_concurrent_checks_admit_exactly_the_limit(limiter: RedisRateLimiter) -> None:
    tenant = _tenant()
    results = await asyncio.gather(*(limiter.check(tenant) for _ in range(50)), return_exceptions=True)
    admitted = [r for r in results if not isinstance(r, BaseException)]
    assert len(admitted) == 10
    assert all(isinstance(r, RateLimitExceededError) for r in results if r not in admitted)
    assert sorted(d.remaining for d in admitted if d is not None) == list(range(10))


async def test_the_script_is_called_by_hash(limiter: RedisRateLimiter, redis_url: str) -> None:
    await limiter.check(_tenant())
    client = Redis.from_url(redis_url)
    try:
        sha = hashlib.sha1(_GCRA.encode()).hexdigest()
        assert await client.script_exists(sha) == [True]
    finally:
        await client.aclose()
    assert limiter._script.sha == sha


async def test_retry_after_is_when_a_request_is_admitted_again(redis_url: str, redis_prefix: str) -> None:
    limiter = RedisRateLimiter(redis_url, prefix=redis_prefix, requests=2, window=0.6)
    try:
        first = await limiter.hit("t", 2, 0.6)
        await limiter.hit("t", 2, 0.6)
        refused = await limiter.hit("t", 2, 0.6)
        assert first.allowed and first.remaining == 1
        assert not refused.allowed
        assert 0.2 < refused.retry_after <= 0.3  # one slot per 0.3 s
        assert 0.4 < refused.reset_after <= 0.6
        await asyncio.sleep(refused.retry_after + 0.01)
        assert (await limiter.hit("t", 2, 0.6)).allowed
    finally:
        await limiter.close()


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_unreachable_redis_fails_open_or_closed_logged_and_counted(
    fail_open: bool, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", fail_open=fail_open, timeout=0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="fastapi_tenancy"):
            for _ in range(3):
                if fail_open:
                    assert await limiter.check(_tenant()) is None
                else:
                    with pytest.raises(TenancyUnavailableError) as refused:
                        await limiter.check(_tenant())
                    assert (refused.value.status_code, refused.value.detail) == (
                        503,
                        "Rate limiter unavailable",
                    )
    finally:
        await limiter.close()
    assert limiter.failures == 3
    assert caplog.text.count("rate limiter unavailable") == 1  # once per outage, not per request


async def test_usage_reads_the_quota_without_counting(limiter: RedisRateLimiter) -> None:
    tenant = _tenant()
    usage = await limiter.usage(tenant)
    assert usage is not None and (usage.limit, usage.used, usage.reset_after) == (10, 0, 0.0)
    for _ in range(4):
        await limiter.check(tenant)
    for _ in range(3):  # reading counts nothing
        usage = await limiter.usage(tenant)
        assert usage is not None and usage.used == 4
        assert 23 < usage.reset_after <= 24  # four slots of 6 s
    decision = await limiter.check(tenant)
    assert decision is not None and decision.remaining == 5


async def test_usage_of_an_unreachable_redis_is_unknown() -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    try:
        assert await limiter.usage(_tenant()) is None
    finally:
        await limiter.close()


async def test_limiter_recovers_when_redis_comes_back(own_redis: OwnRedis) -> None:
    limiter = RedisRateLimiter(own_redis.url, requests=100, window=60, timeout=0.5)
    try:
        tenant = _tenant()
        assert await limiter.check(tenant) is not None
        await own_redis.kill()
        assert await limiter.check(tenant) is None
        await own_redis.start()
        # The restarted Redis has forgotten the script; redis-py loads it again by itself.
        decision = None
        for _ in range(50):
            decision = await limiter.check(tenant)
            if decision is not None:
                break
            await asyncio.sleep(0.05)
        assert decision is not None and decision.allowed
    finally:
        await limiter.close()


async def test_a_limit_finer_than_redis_clock_never_errors(limiter: RedisRateLimiter) -> None:
    # An interval below a microsecond rounds the key's expiry to 0 ms, which SET refuses.
    for _ in range(3):
        assert (await limiter.hit("fine", 10**9, 60)).allowed
