"""ARQ on the real Redis with a real worker process: each job runs as the tenant whose
request enqueued it, reads only that tenant's rows, and a job without a valid, active
tenant is refused, on every try."""

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import retry_key_prefix
from arq.jobs import Job, JobStatus
from fastapi import FastAPI

from fastapi_tenancy import (
    TenancyMiddleware,
    TenantInactiveError,
    TenantNotFoundError,
    TenantResolutionError,
)
from fastapi_tenancy.integrations.arq import TENANT_KWARG, enqueue_tenant_job

from ..apps import Base
from ..conftest import Tenants

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def pool(redis_url: str, unique: str) -> AsyncIterator[ArqRedis]:
    redis = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=unique)
    try:
        yield redis
    finally:
        await redis.delete(unique)
        await redis.aclose()


def _web_app(tenants: Tenants, pool: ArqRedis) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=tenants.manager)

    @app.post("/jobs/{function}")
    async def enqueue(function: str) -> dict[str, str]:
        job = await enqueue_tenant_job(pool, function)
        assert job is not None
        return {"job_id": job.job_id}

    return app


async def _run_worker(tenants: Tenants, queue: str) -> None:
    """Run the worker in burst mode in a process of its own, until the queue is empty."""
    env = {
        **os.environ,
        "TENANCY_DATABASE_URL": tenants.url,
        "TENANCY_MAINTENANCE_RETRY_AFTER": "1",
        "FT_TEST_QUEUE": queue,
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "arq",
        "tests.integrations.arq_worker.WorkerSettings",
        "--burst",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(worker.communicate(), timeout=120)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert worker.returncode == 0, output.decode(errors="replace")


async def _outcome(pool: ArqRedis, queue: str, job_id: str) -> Any:
    """The job's result, or the exception it failed with."""
    job = Job(job_id, pool, _queue_name=queue)
    assert await job.status() == JobStatus.complete
    try:
        return await job.result(timeout=5)
    except Exception as exc:
        return exc


async def test_jobs_run_in_a_worker_process_as_their_requests_tenant(
    tenants: Tenants, pool: ArqRedis, unique: str
) -> None:
    manager = tenants.manager
    await manager.register_tenant("gamma", "Gamma", app_metadata=Base.metadata)
    alpha = await manager.get_tenant("alpha")
    transport = httpx.ASGITransport(app=_web_app(tenants, pool))
    jobs: dict[str, str] = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for tenant, function in [
            ("alpha", "read_orders"),
            ("beta", "read_orders"),
            ("gamma", "suspend_then_retry"),
        ]:
            response = await client.post(f"/jobs/{function}", headers={"X-Tenant-ID": tenant})
            assert response.status_code == 200, response.text
            jobs[tenant] = response.json()["job_id"]
    # Straight onto the queue, bypassing enqueue_tenant_job: no tenant, a malformed one,
    # and a forged one (alpha's slug with another id).
    extras: list[tuple[str, dict[str, Any]]] = [
        ("none", {}),
        ("malformed", {TENANT_KWARG: "alpha"}),
        ("forged", {TENANT_KWARG: {"identifier": "alpha", "id": "0" * 32}}),
    ]
    for name, extra in extras:
        job = await pool.enqueue_job("read_orders", **extra)
        assert job is not None
        jobs[name] = job.job_id

    await _run_worker(tenants, unique)

    results = {name: await _outcome(pool, unique, job_id) for name, job_id in jobs.items()}
    assert results["alpha"]["tenant"] == "alpha"
    assert results["alpha"]["orders"] == ["alpha-1", "alpha-2"]
    assert results["alpha"]["order_1"] == "alpha-1"
    assert results["beta"]["tenant"] == "beta"
    assert results["beta"]["orders"] == ["beta-1", "beta-3"]
    assert results["beta"]["order_1"] == "beta-1"
    assert results["alpha"]["pid"] != os.getpid()  # really another process
    assert isinstance(results["none"], TenantResolutionError), results["none"]
    assert isinstance(results["malformed"], TenantResolutionError), results["malformed"]
    assert isinstance(results["forged"], TenantNotFoundError), results["forged"]
    # The retry after the suspension was refused before the function ran again.
    assert isinstance(results["gamma"], TenantInactiveError), results["gamma"]
    # As the worker raised it: the message once, not wrapped in itself by unpickling.
    assert str(results["gamma"]) == "Tenant is not active (status: suspended)"
    assert results["gamma"].status == "suspended"
    info = await Job(jobs["gamma"], pool, _queue_name=unique).result_info()
    assert info is not None and info.job_try == 2 and not info.success
    assert (await manager.get_tenant("alpha")).id == alpha.id  # untouched by the forged job


async def test_enqueueing_without_a_tenant_is_refused_at_the_source(pool: ArqRedis, unique: str) -> None:
    with pytest.raises(TenantResolutionError):
        await enqueue_tenant_job(pool, "read_orders")
    assert await pool.zcard(unique) == 0  # nothing was queued


async def test_a_job_of_a_tenant_in_maintenance_waits_for_it_to_end(
    tenants: Tenants, pool: ArqRedis, unique: str
) -> None:
    manager = tenants.manager
    await manager.start_maintenance("alpha")
    job = await enqueue_tenant_job(pool, "read_orders", tenant=await manager.get_tenant("alpha"))
    assert job is not None
    worker = asyncio.create_task(_run_worker(tenants, unique))
    try:
        # The first try found the maintenance and was deferred (not failed): end it then.
        for _ in range(600):
            tried = await pool.get(retry_key_prefix + job.job_id)
            if tried and await job.status() == JobStatus.deferred:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the job was never deferred")
        await manager.end_maintenance("alpha")
    finally:
        await worker
    result = await _outcome(pool, unique, job.job_id)
    assert result["tenant"] == "alpha" and result["orders"] == ["alpha-1", "alpha-2"], result
    info = await job.result_info()
    assert info is not None and info.success and info.job_try >= 2
