"""One Redis client shared by the rate limiter and the tenant cache, under cancellation
(checklist item 21, the ChatGPT incident of March 2023): requests cancelled at random
points, many of them in the middle of a Redis reply, never leave a reply on a pooled
connection for a later request to read. Every answer that arrives carries the tenant of
the request that asked, during the flood and after it."""

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware, current_tenant
from fastapi_tenancy.cache import TenantCache
from fastapi_tenancy.cache.redis import RedisCacheBackend

TENANTS = [f"tenant-{n}" for n in range(6)]
# Big enough that a reply spans many socket reads, so a cancellation often lands inside one.
PAD = 256 * 1024
ROUNDS = 12
PER_ROUND = 48


class Counters:
    """How many cache reads the route started and finished: the difference over the cancelled
    requests is how many were cancelled with a Redis call in flight."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0


def build_app(manager: TenancyManager, cache: TenantCache, counters: Counters) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)  # rate-limits through manager.redis

    @app.get("/blob")
    async def blob() -> dict[str, Any]:
        counters.started += 1
        value = await cache.get("blob")  # through the same client as the limiter
        counters.finished += 1
        return {"asked": current_tenant().identifier, "got": value["tenant"], "size": len(value["pad"])}

    return app


@asynccontextmanager
async def shared_client_app(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[httpx.AsyncClient, TenancyManager, Counters]]:
    config = TenancyConfig(
        database_url=postgres_url,
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
        rate_limit_enabled=True,
        rate_limit_requests=1_000_000,
    )
    manager = TenancyManager(config)
    await manager.initialize()
    assert manager.redis is not None and manager.rate_limiter is not None
    cache_prefix = redis_prefix.replace(":", ".").rstrip(".")
    # The very client the limiter and the invalidation channel use.
    cache = TenantCache(RedisCacheBackend(manager.redis), prefix=cache_prefix, ttl=120)
    counters = Counters()
    try:
        for slug in TENANTS:
            tenant = await manager.register_tenant(slug, slug)
            await cache.set("blob", {"tenant": slug, "pad": slug[-1] * PAD}, tenant=tenant)
        transport = httpx.ASGITransport(app=build_app(manager, cache, counters))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, manager, counters
    finally:
        keys = [key async for key in manager.redis.scan_iter(match=f"{cache_prefix}:*", count=1000)]
        if keys:
            await manager.redis.delete(*keys)
        await manager.close()


async def _ask(client: httpx.AsyncClient, slug: str) -> None:
    response = await client.get("/blob", headers={"X-Tenant-ID": slug})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["asked"], body["got"], body["size"]) == (slug, slug, PAD), (slug, body)


async def _cancel_after(task: asyncio.Task[None], rng: random.Random) -> None:
    if rng.random() < 0.5:
        await asyncio.sleep(rng.uniform(0, 0.02))
    else:
        for _ in range(rng.randrange(60)):
            await asyncio.sleep(0)
    task.cancel()


async def test_cancelled_requests_never_leave_a_reply_for_another_tenant(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    rng = random.Random(20230320)
    async with shared_client_app(postgres_url, redis_url, redis_prefix) as (client, manager, counters):
        cancelled = completed = mid_call = rounds = 0
        # More rounds if too few cancellations landed inside a Redis call (a loaded machine).
        while rounds < ROUNDS or (mid_call < 10 and rounds < 4 * ROUNDS):
            rounds += 1
            before = (counters.started, counters.finished)
            doomed = [asyncio.create_task(_ask(client, rng.choice(TENANTS))) for _ in range(PER_ROUND)]
            # Requests of every tenant run beside the doomed ones on the same client, uncancelled.
            survivors = [asyncio.create_task(_ask(client, slug)) for slug in TENANTS]
            await asyncio.gather(*(_cancel_after(task, rng) for task in doomed))
            outcomes = await asyncio.gather(*doomed, return_exceptions=True)
            await asyncio.gather(*survivors)  # raises on a wrong tenant or a failure
            for outcome in outcomes:
                if isinstance(outcome, asyncio.CancelledError):
                    cancelled += 1
                elif outcome is None:
                    completed += 1
                else:
                    raise outcome
            # Reads started this round and never finished, though the round is over: cancelled mid-call.
            mid_call += (counters.started - before[0]) - (counters.finished - before[1])
            # Afterwards: each tenant in turn, then all at once, on whatever connections the pool hands out.
            for slug in TENANTS:
                await _ask(client, slug)
            await asyncio.gather(*(_ask(client, slug) for slug in TENANTS * 3))
        print(f"\n{cancelled} cancelled ({mid_call} inside a cache read), {completed} completed")
        assert mid_call >= 10, "too few cancellations landed in a Redis call to prove anything"
        # The shared client still answers the limiter's script correctly, too.
        for slug in TENANTS:
            tenant = await manager.lookup.get(slug)
            assert tenant is not None and manager.rate_limiter is not None
            decision = await manager.rate_limiter.check(tenant)
            assert decision is not None and decision.allowed and decision.limit == 1_000_000
        assert manager.rate_limiter is not None and manager.rate_limiter.failures == 0
