"""Rate limiting without Redis: GCRA in memory, the per-tenant policy, and the middleware's 429."""

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from fastapi_tenancy import RateLimitExceededError, TenancyConfig, TenancyManager, Tenant, TenantStatus
from fastapi_tenancy.ratelimit import MemoryRateLimiter, RateLimitDecision
from fastapi_tenancy.ratelimit.base import gcra

from ..apps import Base, build_app


def _tenant(slug: str = "acme", metadata: dict[str, object] | None = None) -> Tenant:
    return Tenant(identifier=slug, name=slug, status=TenantStatus.ACTIVE, metadata=metadata or {})


def test_gcra_admits_a_burst_of_the_limit_then_one_per_interval() -> None:
    tat, now = 0.0, 100.0
    remaining = []
    for _ in range(3):
        new_tat, decision = gcra(tat, now, 3, 3.0)
        assert new_tat is not None and decision.allowed
        tat = new_tat
        remaining.append(decision.remaining)
    assert remaining == [2, 1, 0]
    refused_tat, refused = gcra(tat, now, 3, 3.0)
    assert refused_tat is None and not refused.allowed
    assert refused.retry_after == pytest.approx(1.0)  # one slot per 3 s / 3
    assert refused.reset_after == pytest.approx(3.0)
    # Exactly when Retry-After says, the request is admitted.
    later_tat, later = gcra(tat, now + refused.retry_after, 3, 3.0)
    assert later.allowed and later.remaining == 0 and later_tat is not None


def test_headers_of_an_admitted_and_a_refused_decision() -> None:
    admitted = RateLimitDecision(True, 10, 7, 60.0, 18.2, 0.0)
    assert admitted.headers() == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "7",
        "RateLimit-Reset": "19",
        "RateLimit-Policy": "10;w=60",
    }
    refused = RateLimitDecision(False, 10, 0, 0.5, 0.5, 0.05)
    assert refused.headers()["Retry-After"] == "1"  # never 0: rounded up, at least 1
    assert refused.headers()["RateLimit-Policy"] == "10;w=0.5"


async def test_memory_limiter_refuses_past_the_limit_per_tenant() -> None:
    limiter = MemoryRateLimiter(requests=2, window=60)
    acme, globex = _tenant("acme"), _tenant("globex")
    assert [(await limiter.check(acme)) is not None for _ in range(2)] == [True, True]
    with pytest.raises(RateLimitExceededError) as refused:
        await limiter.check(acme)
    assert refused.value.status_code == 429
    assert refused.value.detail == "Rate limit exceeded for tenant acme"
    assert refused.value.headers["Retry-After"] == "30"
    assert await limiter.check(globex) is not None  # its own quota


async def test_usage_reads_the_quota_without_counting() -> None:
    limiter = MemoryRateLimiter(requests=3, window=60)
    acme = _tenant("acme")
    usage = await limiter.usage(acme)
    assert usage is not None
    assert (usage.limit, usage.window, usage.used, usage.reset_after) == (3, 60.0, 0, 0.0)
    await limiter.check(acme)
    await limiter.check(acme)
    for _ in range(3):  # reading is not a request: the answer does not move
        usage = await limiter.usage(acme)
        assert usage is not None and usage.used == 2
        assert 39 < usage.reset_after <= 40  # two slots of 20 s
    await limiter.check(acme)
    usage = await limiter.usage(acme)
    assert usage is not None and usage.used == 3
    with pytest.raises(RateLimitExceededError):
        await limiter.check(acme)
    other = await limiter.usage(_tenant("globex"))
    assert other is not None and other.used == 0


async def test_refusals_reach_the_hooks_and_a_failing_hook_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = MemoryRateLimiter(requests=1, window=60)
    seen: list[tuple[str, bool]] = []

    def broken(tenant: Tenant, decision: RateLimitDecision) -> None:
        raise RuntimeError("hook down")

    limiter.on_refused.append(broken)
    limiter.on_refused.append(lambda tenant, decision: seen.append((tenant.identifier, decision.allowed)))
    acme = _tenant("acme")
    await limiter.check(acme)
    assert seen == []  # admitted requests are not refusals
    with caplog.at_level(logging.ERROR, logger="fastapi_tenancy"), pytest.raises(RateLimitExceededError):
        await limiter.check(acme)
    assert seen == [("acme", False)]
    assert "refusal hook" in caplog.text


async def test_memory_limiter_stays_bounded() -> None:
    limiter = MemoryRateLimiter(requests=5, window=60, max_keys=3)
    for i in range(10):
        await limiter.hit(f"tenant-{i}", 5, 60)
    assert len(limiter._tats) <= 3


@pytest.mark.parametrize(
    ("metadata", "expected", "warns"),
    [
        ({}, (100, 60.0), False),
        ({"plan": "pro"}, (1000, 60.0), False),
        ({"plan": "unknown"}, (100, 60.0), False),
        ({"plan": "pro", "rate_limit": {"requests": 5}}, (5, 60.0), False),
        ({"rate_limit": {"requests": 5, "window": 1}}, (5, 1.0), False),
        ({"rate_limit": {"window": 10}}, (100, 10.0), False),
        # A bad override must never lift the limit: the plan's or the default stays.
        ({"plan": "pro", "rate_limit": {"requests": 0}}, (1000, 60.0), True),
        ({"rate_limit": {"requests": "lots"}}, (100, 60.0), True),
        ({"rate_limit": {"requests": True}}, (100, 60.0), True),
        ({"rate_limit": {"requests": 2.5}}, (100, 60.0), True),
        ({"rate_limit": {"window": -1}}, (100, 60.0), True),
    ],
    ids=[
        "default",
        "plan",
        "unknown-plan",
        "metadata-beats-plan",
        "metadata-both",
        "metadata-window",
        "invalid-keeps-plan",
        "string",
        "bool",
        "fraction",
        "negative-window",
    ],
)
def test_policy_from_plan_and_metadata(
    metadata: dict[str, object], expected: tuple[int, float], warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = MemoryRateLimiter(requests=100, window=60, plans={"pro": 1000})
    with caplog.at_level(logging.WARNING, logger="fastapi_tenancy"):
        assert limiter.limits(_tenant(metadata=metadata)) == expected
    assert ("ignoring invalid rate_limit" in caplog.text) == warns


def test_a_changed_tenant_gets_its_new_policy() -> None:
    limiter = MemoryRateLimiter(requests=100, window=60)
    tenant = _tenant()
    assert limiter.limits(tenant) == (100, 60.0)
    assert limiter.limits(tenant.with_changes(metadata={"rate_limit": {"requests": 3}})) == (3, 60.0)


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = TenancyConfig(
        database_url=f"sqlite:///{tmp_path / 'app.db'}",
        rate_limit_enabled=True,
        rate_limit_requests=2,
        rate_limit_window=10,
    )
    manager = TenancyManager(config)
    await manager.initialize()
    await manager.register_tenant("acme-corp", "Acme", app_metadata=Base.metadata)
    await manager.register_tenant("globex", "Globex", app_metadata=Base.metadata, metadata={"plan": "x"})
    transport = httpx.ASGITransport(app=build_app(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
    await manager.close()


async def test_middleware_answers_429_with_retry_after(limited: httpx.AsyncClient) -> None:
    acme = {"X-Tenant-ID": "acme-corp"}
    first, second, third = [await limited.get("/orders", headers=acme) for _ in range(3)]
    assert (first.status_code, second.status_code) == (200, 200), first.text
    assert (first.headers["ratelimit-remaining"], second.headers["ratelimit-remaining"]) == ("1", "0")
    assert first.headers["ratelimit-limit"] == "2"
    assert first.headers["ratelimit-policy"] == "2;w=10"
    assert third.status_code == 429
    assert third.content == b'{"detail": "Rate limit exceeded for tenant acme-corp"}'
    assert third.headers["content-type"] == "application/json"
    assert third.headers["retry-after"] == "5"  # 10 s / 2 requests
    assert third.headers["ratelimit-remaining"] == "0"
    assert third.headers["ratelimit-reset"] == "10"
    # Another tenant, and paths outside tenancy, are not counted against acme-corp.
    assert (await limited.get("/orders", headers={"X-Tenant-ID": "globex"})).status_code == 200
    health = await limited.get("/health")
    assert health.status_code == 200 and "ratelimit-limit" not in health.headers


async def test_disabled_by_default(tmp_path: Path) -> None:
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    assert manager.rate_limiter is None
    enabled = TenancyManager(
        TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}", rate_limit_enabled=True)
    )
    assert isinstance(enabled.rate_limiter, MemoryRateLimiter)
    await manager.close()
    await enabled.close()
