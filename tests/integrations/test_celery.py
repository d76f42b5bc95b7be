"""Celery with a real worker process, on RabbitMQ and on Redis: each task runs as the tenant whose
request sent it, reads only that tenant's rows, and a task without a valid, active tenant in its
headers is refused, on every try; a tenant in maintenance has its tasks retried later."""

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from celery.result import AsyncResult
from fastapi import FastAPI

from fastapi_tenancy import (
    TenancyMiddleware,
    TenantInactiveError,
    TenantMismatchError,
    TenantNotFoundError,
    TenantResolutionError,
    tenant_scope,
)
from fastapi_tenancy.integrations.celery import TENANT_HEADER

from ..apps import Base
from ..conftest import REDIS_URL, REQUIRE_SERVICES, Tenants
from .celery_worker import build

ROOT = Path(__file__).resolve().parents[2]
AMQP_URL = os.environ.get("TENANCY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

# (broker, worker pool): both brokers, and both pools that run one task at a time per process.
SETUPS = [("amqp", "prefork"), ("redis", "solo")]


def _reachable(app: Celery) -> str | None:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(params=SETUPS, ids=[f"{b}-{p}" for b, p in SETUPS])
def setup(request: pytest.FixtureRequest, redis_url: str, unique: str) -> Iterator[tuple[str, str, str]]:
    """(broker URL, pool, queue): a queue of this test's own, deleted afterwards."""
    broker_name, pool = request.param
    broker = AMQP_URL if broker_name == "amqp" else REDIS_URL
    app = Celery(broker=broker, set_as_current=False)
    problem = _reachable(app)
    if problem is not None:
        if REQUIRE_SERVICES:
            pytest.fail(f"{broker_name} is required (TENANCY_TEST_REQUIRE_SERVICES=1): {problem}")
        pytest.skip(f"{broker_name} not reachable: {problem}")
    yield broker, pool, unique
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if broker_name == "amqp":
            channel.queue_delete(unique)
            channel.exchange_delete(unique)
        else:
            client = channel.client
            client.delete(unique, f"_kombu.binding.{unique}")


@pytest.fixture
async def results() -> AsyncIterator[list[str]]:
    """Task ids whose results the test read; their keys in the result backend go afterwards."""
    ids: list[str] = []
    yield ids
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    try:
        if ids:
            await client.delete(*(f"celery-task-meta-{i}" for i in ids))
    finally:
        await client.aclose()


class Worker:
    """`celery worker` in a process of its own, consuming the test's queue only."""

    def __init__(self, tenants: Tenants, broker: str, pool: str, queue: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.integrations.celery_worker",
            "worker",
            "-Q",
            queue,
            "-n",
            f"{queue}@localhost",
            "--pool",
            pool,
            "--concurrency",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "warning",
        ]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")},
            "TENANCY_DATABASE_URL": tenants.url,
            "TENANCY_MAINTENANCE_RETRY_AFTER": "1",
            "FT_TEST_BROKER": broker,
            "FT_TEST_QUEUE": queue,
        }
        self.process: asyncio.subprocess.Process | None = None
        self.output = ""

    async def __aenter__(self) -> "Worker":
        self.process = await asyncio.create_subprocess_exec(
            *self.args,
            cwd=ROOT,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown: the manager is closed
        try:
            output, _ = await asyncio.wait_for(self.process.communicate(), timeout=60)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        self.output = output.decode(errors="replace")  # refused tasks are logged there, with tracebacks
        assert self.process.returncode == 0, self.output


async def _outcome(app: Celery, task_id: str, results: list[str]) -> Any:
    """The task's result, or the exception it failed with (as the result backend rebuilt it)."""
    results.append(task_id)
    result = AsyncResult(task_id, app=app)
    try:
        return await asyncio.to_thread(result.get, timeout=90, propagate=True)
    except Exception as exc:
        return exc


def _web_app(tenants: Tenants, tasks: dict[str, Any]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=tenants.manager)

    @app.post("/jobs/{name}")
    def enqueue(name: str) -> dict[str, str]:
        # A sync route (publishing blocks): FastAPI runs it in the thread pool, tenant and all.
        args = ("sent by a request of",) if name == "whoami_sync" else ()
        return {"task_id": tasks[name].delay(*args).id}

    return app


async def test_tasks_run_in_a_worker_process_as_their_requests_tenant(
    tenants: Tenants, setup: tuple[str, str, str], results: list[str]
) -> None:
    broker, pool, queue = setup
    manager = tenants.manager
    await manager.register_tenant("gamma", "Gamma", app_metadata=Base.metadata)
    await manager.register_tenant("delta", "Delta", app_metadata=Base.metadata)
    alpha = await manager.get_tenant("alpha")
    client_app, tasks = build(broker, queue, manager)
    sent: dict[str, str] = {}
    transport = httpx.ASGITransport(app=_web_app(tenants, tasks))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for name, tenant, task in [
            ("alpha", "alpha", "read_orders"),
            ("beta", "beta", "read_orders"),
            ("alpha-sync", "alpha", "whoami_sync"),
            ("beta-fan-out", "beta", "fan_out"),
            ("gamma", "gamma", "suspend_then_retry"),
        ]:
            response = await client.post(f"/jobs/{task}", headers={"X-Tenant-ID": tenant})
            assert response.status_code == 200, response.text
            sent[name] = response.json()["task_id"]
    # Straight onto the queue, bypassing the tenant task's apply_async: no tenant, malformed
    # ones, and a forged one (alpha's slug with another id).
    for name, headers in [
        ("none", {}),
        ("malformed", {TENANT_HEADER: "alpha"}),
        ("half", {TENANT_HEADER: {"identifier": "alpha"}}),
        ("forged", {TENANT_HEADER: {"identifier": "alpha", "id": "0" * 32}}),
    ]:
        sent[name] = client_app.send_task("read_orders", headers=headers, queue=queue).id
    # A tenant in maintenance: its task waits for the maintenance to end.
    await manager.start_maintenance("delta")
    sent["delta"] = tasks["read_orders"].apply_async(tenant=await manager.get_tenant("delta")).id

    async with Worker(tenants, broker, pool, queue):
        for _ in range(600):
            if AsyncResult(sent["delta"], app=client_app).state == "RETRY":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the task of the tenant in maintenance was not put off")
        await manager.end_maintenance("delta")
        outcomes = {name: await _outcome(client_app, task_id, results) for name, task_id in sent.items()}
        child = await _outcome(client_app, outcomes["beta-fan-out"], results)

    assert outcomes["alpha"]["tenant"] == "alpha"
    assert outcomes["alpha"]["orders"] == ["alpha-1", "alpha-2"]
    assert outcomes["alpha"]["order_1"] == "alpha-1"
    assert outcomes["beta"]["tenant"] == "beta"
    assert outcomes["beta"]["orders"] == ["beta-1", "beta-3"]
    assert outcomes["beta"]["order_1"] == "beta-1"
    assert outcomes["alpha"]["pid"] != os.getpid()  # really another process
    assert outcomes["alpha-sync"] == "sent by a request of alpha"
    assert child == "sent by a task to beta"
    for name in ("none", "malformed", "half"):
        assert isinstance(outcomes[name], TenantResolutionError), (name, outcomes[name])
    assert isinstance(outcomes["forged"], TenantNotFoundError), outcomes["forged"]
    # The retry after the suspension was refused before the function ran again, and the
    # error came back through the JSON result backend as the worker raised it.
    assert isinstance(outcomes["gamma"], TenantInactiveError), outcomes["gamma"]
    assert str(outcomes["gamma"]) == "Tenant is not active (status: suspended)"
    assert outcomes["gamma"].status == "suspended"
    assert outcomes["delta"]["tenant"] == "delta" and outcomes["delta"]["orders"] == []
    assert (await manager.get_tenant("alpha")).id == alpha.id  # untouched by the forged task


async def test_sending_without_a_tenant_is_refused_at_the_source(tenants: Tenants, unique: str) -> None:
    # An in-memory broker: the refusal comes before anything would be published.
    _, tasks = build("memory://", unique, tenants.manager)
    with pytest.raises(TenantResolutionError):
        tasks["read_orders"].delay()


async def test_a_task_sent_in_one_tenants_scope_with_anothers_headers_is_refused(
    tenants: Tenants, unique: str
) -> None:
    _, tasks = build("memory://", unique, tenants.manager)
    alpha, beta = await tenants.manager.get_tenant("alpha"), await tenants.manager.get_tenant("beta")
    header = {TENANT_HEADER: {"identifier": beta.identifier, "id": beta.id}}
    with tenant_scope(alpha), pytest.raises(TenantMismatchError):
        tasks["read_orders"].apply_async(headers=header)
