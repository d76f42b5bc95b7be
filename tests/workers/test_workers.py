"""Two uvicorn workers against real Redis and PostgreSQL: invalidation, exact limits, Redis outages,
metrics summed over the workers.

Each test starts tests/workers/app.py with `uvicorn --workers 2` and changes tenants from
this process (a third one), as an admin job or another host would.
"""

import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastapi_tenancy import TenancyConfig, TenancyManager

from ..servers import OwnRedis, fresh_client, serve_workers

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _env(postgres_url: str, **settings: object) -> dict[str, str]:
    env = {
        "TENANCY_DATABASE_URL": postgres_url,
        "TENANCY_DATABASE_POOL_SIZE": "2",
        "TENANCY_DATABASE_MAX_OVERFLOW": "2",
        # Long enough that without invalidation a worker would serve a stale tenant
        # for the whole test.
        "TENANCY_CACHE_TTL": "300",
    }
    env.update(
        {
            f"TENANCY_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in settings.items()
        }
    )
    return env


@pytest.fixture
async def admin_factory() -> AsyncIterator[list[TenancyManager]]:
    managers: list[TenancyManager] = []
    yield managers
    for manager in managers:
        await manager.close()


async def _admin(managers: list[TenancyManager], env: dict[str, str]) -> TenancyManager:
    settings = {
        key.removeprefix("TENANCY_").lower(): value
        for key, value in env.items()
        if key.startswith("TENANCY_")
    }
    manager = TenancyManager(TenancyConfig(**settings))  # type: ignore[arg-type]
    managers.append(manager)
    await manager.initialize()
    return manager


async def _burst(
    client: httpx.AsyncClient, tenant: str, n: int, stagger: float = 0.0
) -> list[httpx.Response]:
    """`n` concurrent requests; with `stagger`, request i starts i * stagger seconds late."""

    async def get(i: int) -> httpx.Response:
        if stagger:
            await asyncio.sleep(i * stagger)
        return await client.get("/whoami", headers={"X-Tenant-ID": tenant})

    return list(await asyncio.gather(*(get(i) for i in range(n))))


async def _both_workers_serve(client: httpx.AsyncClient, tenant: str) -> set[str]:
    pids: set[str] = set()
    for _ in range(100):
        for response in await _burst(client, tenant, 4):
            assert response.status_code == 200, response.text
            pids.add(response.headers["x-worker-pid"])
        if len(pids) == 2:
            return pids
    raise AssertionError(f"only worker(s) {pids} answered")


async def _until_both_refuse(client: httpx.AsyncClient, tenant: str, started: float) -> dict[str, float]:
    """Seconds after `started` at which each worker first answered 403; no 200 after that."""
    first_403: dict[str, float] = {}
    for _ in range(500):
        for response in await _burst(client, tenant, 4):
            pid = response.headers["x-worker-pid"]
            if response.status_code == 403:
                first_403.setdefault(pid, time.monotonic() - started)
                assert response.json() == {"detail": "Tenant is not active (status: suspended)"}
            else:
                assert response.status_code == 200, response.text
                assert pid not in first_403, "a worker served the tenant again after refusing it"
        if len(first_403) == 2:
            return first_403
        if time.monotonic() - started > 5:
            break
    raise AssertionError(f"not every worker refused within 5 s: {first_403}")


@pytest.mark.parametrize("channel", ["redis", "postgres"])
async def test_a_suspension_reaches_both_workers_within_one_second(
    channel: str,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    admin_factory: list[TenancyManager],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = {"redis_url": redis_url, "redis_key_prefix": redis_prefix} if channel == "redis" else {}
    env = _env(postgres_url, **settings)
    admin = await _admin(admin_factory, env)
    await admin.register_tenant("acme", "Acme")
    async with serve_workers(env) as base_url, fresh_client(base_url) as client:
        await _both_workers_serve(client, "acme")  # both now hold "acme: active" in their cache
        started = time.monotonic()
        await admin.suspend_tenant("acme")
        suspended = time.monotonic() - started
        first_403 = await _until_both_refuse(client, "acme", started)
    slowest = max(first_403.values())
    with capsys.disabled():
        print(
            f"\n[{channel}] suspend call {suspended * 1000:.0f} ms; first 403 per worker after "
            + ", ".join(f"{t * 1000:.0f} ms" for t in sorted(first_403.values()))
        )
    assert slowest <= 1.0, first_403


@pytest.mark.parametrize("channel", ["redis", "postgres"])
async def test_maintenance_reaches_both_workers_and_so_does_its_end(
    channel: str,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    admin_factory: list[TenancyManager],
) -> None:
    settings = {"redis_url": redis_url, "redis_key_prefix": redis_prefix} if channel == "redis" else {}
    env = _env(postgres_url, maintenance_retry_after=30, **settings)
    admin = await _admin(admin_factory, env)
    await admin.register_tenant("acme", "Acme")
    async with serve_workers(env) as base_url, fresh_client(base_url) as client:
        await _both_workers_serve(client, "acme")  # both now hold "acme: active" in their cache
        started = time.monotonic()
        await admin.start_maintenance("acme")
        first_503: dict[str, float] = {}
        while len(first_503) < 2 and time.monotonic() - started < 5:
            for response in await _burst(client, "acme", 4):
                pid = response.headers["x-worker-pid"]
                if response.status_code == 503:
                    assert response.json() == {"detail": "Tenant is under maintenance"}
                    assert response.headers["retry-after"] == "30"
                    first_503.setdefault(pid, time.monotonic() - started)
                else:
                    assert response.status_code == 200, response.text
                    assert pid not in first_503, "a worker served the tenant again during the maintenance"
        assert len(first_503) == 2 and max(first_503.values()) <= 1.0, first_503
        # The workers' own health checks never stopped answering.
        assert (await client.get("/health")).status_code == 200
        ended = time.monotonic()
        await admin.end_maintenance("acme")
        served: set[str] = set()
        while len(served) < 2 and time.monotonic() - ended < 5:
            for response in await _burst(client, "acme", 4):
                assert response.status_code in (200, 503), response.text
                if response.status_code == 200:
                    served.add(response.headers["x-worker-pid"])
        assert len(served) == 2, "not every worker served the tenant again within 5 s"


async def test_two_workers_together_admit_exactly_the_limit(
    postgres_url: str, redis_url: str, redis_prefix: str, admin_factory: list[TenancyManager]
) -> None:
    limit = 10
    env = _env(
        postgres_url,
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
        rate_limit_enabled=True,
        rate_limit_requests=limit,
        rate_limit_window=600,
    )
    admin = await _admin(admin_factory, env)
    await admin.register_tenant("globex", "Globex")
    async with serve_workers(env) as base_url, fresh_client(base_url) as client:
        # A burst whose requests all land on one worker proves nothing about sharing:
        # try again with a fresh tenant until both workers took part.
        for attempt in range(5):
            tenant = f"acme-{attempt}"
            await admin.register_tenant(tenant, "Acme")
            responses = await _burst(client, tenant, 4 * limit, stagger=0.002)
            statuses = Counter(r.status_code for r in responses)
            assert statuses == {200: limit, 429: 3 * limit}, statuses
            if len({r.headers["x-worker-pid"] for r in responses}) == 2:
                break
        else:
            raise AssertionError("no burst reached both workers")
        other = await _burst(client, "globex", limit)
    refused = [r for r in responses if r.status_code == 429]
    for response in refused:
        assert response.json() == {"detail": f"Rate limit exceeded for tenant {tenant}"}
        # One request per 600 s / 10 = 60 s comes back: retry after at most a minute.
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert response.headers["ratelimit-limit"] == str(limit)
        assert response.headers["ratelimit-remaining"] == "0"
    admitted = sorted(int(r.headers["ratelimit-remaining"]) for r in responses if r.status_code == 200)
    assert admitted == list(range(limit)), admitted  # each admitted request saw its own count
    assert Counter(r.status_code for r in other) == {200: limit}, "another tenant's quota was touched"


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_killing_redis_under_load_gives_no_500_and_recovers(
    fail_open: bool,
    postgres_url: str,
    own_redis: OwnRedis,
    admin_factory: list[TenancyManager],
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _env(
        postgres_url,
        redis_url=own_redis.url,
        redis_timeout=0.5,
        rate_limit_enabled=True,
        rate_limit_requests=100_000,
        rate_limit_fail_open=fail_open,
    )
    admin = await _admin(admin_factory, env)
    await admin.register_tenant("acme", "Acme")
    # (start, end, status, rate-limit headers present) of every request
    seen: list[tuple[float, float, int, bool]] = []
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.monotonic()
            r = await client.get("/whoami", headers={"X-Tenant-ID": "acme"})
            seen.append((started, time.monotonic(), r.status_code, "ratelimit-limit" in r.headers))
            if r.status_code == 503:
                assert r.json() == {"detail": "Rate limiter unavailable"}

    def recovered_since(moment: float) -> bool:
        return any(start > moment and status == 200 and headers for start, _, status, headers in seen)

    async with serve_workers(env) as base_url, fresh_client(base_url) as client:
        loaders = [asyncio.create_task(load(client)) for _ in range(4)]
        await asyncio.sleep(0.5)
        await own_redis.kill()
        killed = time.monotonic()
        await asyncio.sleep(1.5)
        restarting = time.monotonic()
        await own_redis.start()
        restarted = time.monotonic()
        for _ in range(200):
            if recovered_since(restarted):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*loaders)
        assert recovered_since(restarted), "the limiter did not come back after Redis restarted"
        # Invalidation recovered too: a change made now still reaches both workers.
        await _both_workers_serve(client, "acme")
        started = time.monotonic()
        await admin.suspend_tenant("acme")
        first_403 = await _until_both_refuse(client, "acme", started)
        assert max(first_403.values()) <= 1.0, first_403

    statuses = Counter(status for _, _, status, _ in seen)
    assert 500 not in statuses, statuses
    outage = [(end - start, status) for start, end, status, _ in seen if start > killed and end < restarting]
    during = Counter(status for _, status in outage)
    expected = {200} if fail_open else {503}
    with capsys.disabled():
        print(
            f"\n[{'fail-open' if fail_open else 'fail-closed'}] {len(seen)} requests, {dict(statuses)}; "
            f"during the outage {dict(during)}, slowest {max(t for t, _ in outage) * 1000:.0f} ms"
        )
    assert during and set(during) == expected, during


async def _cli(env: dict[str, str], *args: str) -> tuple[int, Any]:
    """`fastapi-tenancy --json <args>` in a process of its own, configured by `env` alone."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "fastapi-tenancy"),
        "--json",
        *args,
        env={**environment, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, json.loads(stdout) if stdout.strip() else stderr.decode()


async def test_a_cli_without_the_workers_channel_is_refused_and_one_with_it_is_heard_at_once(
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    admin_factory: list[TenancyManager],
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _env(postgres_url, redis_url=redis_url, redis_key_prefix=redis_prefix)
    admin = await _admin(admin_factory, env)
    await admin.register_tenant("acme", "Acme")
    async with serve_workers(env) as base_url, fresh_client(base_url) as client:
        await _both_workers_serve(client, "acme")
        # The operator's shell without TENANCY_REDIS_URL: its change would reach neither
        # worker (they would serve acme until cache_ttl); it is refused instead.
        forgot = {k: v for k, v in env.items() if not k.startswith("TENANCY_REDIS")}
        code, refused = await _cli(forgot, "tenants", "suspend", "acme")
        assert code == 2, refused
        assert "Fix: set redis_url (TENANCY_REDIS_URL)" in refused["error"]
        await _both_workers_serve(client, "acme")  # nothing was changed
        code, suspended = await _cli(env, "tenants", "suspend", "acme")
        assert code == 0 and suspended[0]["status"] == "suspended", suspended
        started = time.monotonic()  # the command has exited: the change is in the registry
        first_403 = await _until_both_refuse(client, "acme", started)
    with capsys.disabled():
        print(
            "\n[cli] first 403 per worker after the command exited: "
            + ", ".join(f"{t * 1000:.0f} ms" for t in sorted(first_403.values()))
        )
    assert max(first_403.values()) <= 1.0, first_403


def _documented_file(page: str, name: str) -> str:
    """The `# file: <name>` block of a docs page."""
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(# file: ([\w.]+)\n.*?)^```", text, re.M | re.S)
    [code] = [code for code, file in blocks if file == name]
    return str(code)


def _samples(scrape: str, name: str, tenant: str) -> float:
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("tenant") == tenant:
                return float(sample.value)
    return 0.0


@pytest.mark.parametrize("multiprocess", [True, False], ids=["multiprocess", "per-process"])
async def test_metrics_count_the_requests_of_both_workers(
    multiprocess: bool,
    postgres_url: str,
    admin_factory: list[TenancyManager],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The app of docs/background.md ("Several worker processes"), as written.
    (tmp_path / "metrics_app.py").write_text(_documented_file("background.md", "metrics_app.py"))
    env = {**_env(postgres_url), "PYTHONPATH": str(tmp_path), "DOCUMENTED_APP": "metrics_app"}
    if multiprocess:
        (tmp_path / "prometheus").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus")
    admin = await _admin(admin_factory, env)
    await admin.register_tenant("acme", "Acme")
    served: Counter[str] = Counter()
    async with (
        serve_workers(env, app="tests.workers.documented:app") as base_url,
        fresh_client(base_url) as client,
    ):
        while min(served.values(), default=0) < 5 or len(served) < 2:
            response = await client.get("/ping", headers={"X-Tenant-ID": "acme"})
            assert response.status_code == 200, response.text
            served[response.headers["x-worker-pid"]] += 1
            assert served.total() < 500, f"the requests did not reach both workers: {served}"
        scrapes: dict[str, list[tuple[float, float]]] = {}
        while len(scrapes) < 2:
            response = await client.get("/metrics")
            assert response.status_code == 200, response.text
            counted = (
                _samples(response.text, "tenancy_requests_total", "acme"),
                _samples(response.text, "tenancy_request_duration_seconds_count", "acme"),
            )
            scrapes.setdefault(response.headers["x-worker-pid"], []).append(counted)
    total = served.total()
    with capsys.disabled():
        print(
            f"\n[metrics, {'multiprocess' if multiprocess else 'per process'}] served {dict(served)}; "
            f"scrapes {scrapes}"
        )
    for pid, counts in scrapes.items():
        # Multiprocess: every scrape, whichever worker answers it, counts both workers'
        # requests. Without it, each worker shows its own share only.
        expected = float(total if multiprocess else served[pid])
        assert set(counts) == {(expected, expected)}, (pid, counts, served)
