"""The Quick Start of fastapi-tenancy 0.5.0's README, run against this library unchanged: its
code is written to main.py as it stands (only the database URL points at the test database,
and the models it leaves to the reader come first), seeded as 0.5.0's docs seed it, and
served by uvicorn on PostgreSQL and SQLite. What deliberately differs (the status of an
unknown tenant, a change by id) is asserted as it differs; the README's configuration block
fails at startup with a message naming each fix.

The quoted code is from fastapi-tenancy 0.5.0 (MIT licence), kept verbatim on purpose."""

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_tenancy import TenancyConfig, TenancyManager, TenantNotFoundError
from tests.servers import serve_app

README_URL = "postgresql+asyncpg://user:pass@localhost/myapp"

# The README's "Quick Start" block.
README_QUICK_START = """\
from fastapi import FastAPI, Depends
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import TenancyManager, TenancyConfig
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore
from fastapi_tenancy.middleware.tenancy import TenancyMiddleware
from fastapi_tenancy.dependencies import make_tenant_db_dependency

# 1. Configure — all fields overridable via TENANCY_* env vars
config = TenancyConfig(
    database_url="postgresql+asyncpg://user:pass@localhost/myapp",
    resolution_strategy="header",   # read tenant from X-Tenant-ID header
    isolation_strategy="schema",    # one PostgreSQL schema per tenant
)

# 2. Wire
store   = SQLAlchemyTenantStore(config.database_url)
manager = TenancyManager(config, store)

# 3. Mount
app = FastAPI(lifespan=manager.create_lifespan())
app.add_middleware(TenancyMiddleware, manager=manager)

# 4. Use — zero per-route boilerplate
get_tenant_db = make_tenant_db_dependency(manager)

@app.get("/orders")
async def list_orders(db: AsyncSession = Depends(get_tenant_db)):
    # db is already scoped to the current tenant's schema
    result = await db.execute(select(Order))
    return result.scalars().all()
"""

# The README uses `Order` without defining it; 0.5.0's Quick Start page defines it so.
MODELS = """\
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

class Base(DeclarativeBase):
    pass

class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    description: Mapped[str] = mapped_column()

"""

# 0.5.0's Quick Start page, "Register your first tenant".
SEED = """\
import asyncio
from main import manager, Base

async def seed():
    await manager.initialize()

    # Register a tenant (creates the schema + all Base tables inside it)
    tenant = await manager.register_tenant(
        identifier="acme-corp",
        name="Acme Corporation",
        app_metadata=Base.metadata,  # creates tables in the new schema
    )
    print(f"Created: {tenant.identifier} → schema: tenant_acme_corp")

    await manager.close()

asyncio.run(seed())
"""

# Test setup, in this library's own terms: an order for acme-corp, a suspended tenant.
PREPARE = """
import asyncio
from main import manager, Base, Order

async def prepare():
    await manager.initialize()
    async with manager.session("acme-corp") as session:
        session.add(Order(id=1, description="First order"))
        await session.commit()
    await manager.register_tenant("sleepy-co", "Sleepy", app_metadata=Base.metadata)
    await manager.suspend_tenant("sleepy-co")
    await manager.close()

asyncio.run(prepare())
"""

# The README's "Configuration" block.
README_ENVIRONMENT = {
    "TENANCY_ISOLATION_STRATEGY": "schema",
    "TENANCY_RESOLUTION_STRATEGY": "header",
    "TENANCY_CACHE_ENABLED": "true",
    "TENANCY_REDIS_URL": "redis://localhost:6379/0",
    "TENANCY_ENABLE_ENCRYPTION": "true",
    "TENANCY_ENCRYPTION_KEY": "your-secret-key",
    "TENANCY_ENABLE_RATE_LIMITING": "true",
    "TENANCY_RATE_LIMIT_MAX_REQUESTS": "1000",
    "TENANCY_MAX_TENANTS": "500",
    "TENANCY_ENABLE_METRICS": "true",
}


def _project(directory: Path, url: str) -> Path:
    assert README_URL in README_QUICK_START
    main = MODELS + README_QUICK_START.replace(README_URL, url)
    (directory / "main.py").write_text(main, encoding="utf-8")
    (directory / "seed.py").write_text(SEED, encoding="utf-8")
    return directory


def _environment(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}, **extra}


def _python(directory: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=directory, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


async def _serve(directory: Path, env: dict[str, str]) -> AsyncIterator[str]:
    # The 0.5.0 app has no /health: any answer of /orders means it is up.
    async with serve_app(directory, env, ready="/orders") as base:
        yield base


@pytest.fixture
async def seeded(database_url: str, tmp_path: Path) -> tuple[Path, str]:
    directory = _project(tmp_path, database_url)
    env = _environment()
    done = await asyncio.to_thread(_python, directory, env, "seed.py")
    assert (done.returncode, done.stdout) == (0, "Created: acme-corp → schema: tenant_acme_corp\n"), (
        done.stderr
    )
    done = await asyncio.to_thread(_python, directory, env, "-c", PREPARE)
    assert done.returncode == 0, done.stderr
    return directory, database_url


async def test_the_050_readme_quick_start_runs_unchanged(seeded: tuple[Path, str]) -> None:
    directory, _ = seeded
    async for base in _serve(directory, _environment()):
        async with httpx.AsyncClient(base_url=base) as client:
            listed = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
            assert (listed.status_code, listed.json()) == (200, [{"id": 1, "description": "First order"}])
            missing = await client.get("/orders")
            assert (missing.status_code, missing.json()) == (400, {"detail": "Tenant identifier missing"})
            suspended = await client.get("/orders", headers={"X-Tenant-ID": "sleepy-co"})
            assert (suspended.status_code, suspended.json()) == (
                403,
                {"detail": "Tenant is not active (status: suspended)"},
            )
            # Deliberately different: 0.5.0 answered 400 here, 404 says what happened
            # (anti_enumeration=True gives suspended tenants the same 404 too).
            unknown = await client.get("/orders", headers={"X-Tenant-ID": "nobody-inc"})
            assert (unknown.status_code, unknown.json()) == (404, {"detail": "Tenant not found"})


@pytest.mark.postgres
async def test_the_050_rate_limit_variables_limit_the_quick_start(
    postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    # The variables 0.5.0's users set (its docs' rate limiting run): limit 3 per 60 s.
    directory = _project(tmp_path, postgres_url)
    env = _environment(
        TENANCY_ENABLE_RATE_LIMITING="true",
        TENANCY_REDIS_URL=redis_url,
        TENANCY_RATE_LIMIT_PER_MINUTE="3",
        # The shared Redis serves other tests' registries: keys of this run's own.
        TENANCY_REDIS_KEY_PREFIX=redis_prefix,
    )
    # Seeded with the app's own configuration: the registry records the Redis channel
    # its processes announce changes on, and refuses a process configured otherwise.
    done = await asyncio.to_thread(_python, directory, env, "seed.py")
    assert done.returncode == 0, done.stderr
    async for base in _serve(directory, env):
        async with httpx.AsyncClient(base_url=base) as client:
            statuses = []
            for _ in range(5):
                response = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
                statuses.append(response.status_code)
            assert statuses == [200, 200, 200, 429, 429]
            assert "retry-after" in response.headers


def test_the_050_readme_configuration_fails_at_startup_naming_each_fix(tmp_path: Path) -> None:
    directory = _project(tmp_path, f"sqlite:///{tmp_path / 'app.db'}")
    done = _python(directory, _environment(**README_ENVIRONMENT), "-c", "import main")
    assert done.returncode == 1
    error = " ".join(done.stderr.split())
    for refused, fix in [
        ("enable_encryption", "encryption_keys"),
        ("encryption_key", "Fernet keys"),
        ("rate_limit_max_requests", "rate_limit_requests"),
        ("max_tenants", "manager.store.count()"),
        ("enable_metrics", "fastapi_tenancy.metrics"),
    ]:
        assert f"{refused} (fastapi-tenancy 0.5.0) has no exact counterpart" in error, refused
        assert fix in error, fix
    assert "your-secret-key" not in done.stderr  # a refused secret is not echoed back
    # Without the refused settings, the rest is taken (with a warning each) and it starts.
    accepted = {k: v for k, v in README_ENVIRONMENT.items() if k.removeprefix("TENANCY_").lower() not in (
        "enable_encryption", "encryption_key", "rate_limit_max_requests", "max_tenants", "enable_metrics"
    )}  # fmt: skip
    done = _python(
        directory, _environment(**accepted), "-c", "import main; print(main.config.rate_limit_enabled)"
    )
    assert (done.returncode, done.stdout) == (0, "True\n"), done.stderr
    assert "enable_rate_limiting is the fastapi-tenancy 0.5.0 name of rate_limit_enabled" in done.stderr
    assert "cache_enabled: the registry cache is always on" in done.stderr


async def test_the_050_lifecycle_by_id_fails_naming_the_keyword(tmp_path: Path) -> None:
    # The README's "Tenant Lifecycle" passes tenant.id positionally; here that names the fix.
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    await manager.initialize()
    try:
        tenant = await manager.register_tenant(
            identifier="acme-corp",
            name="Acme Corporation",
            metadata={"plan": "enterprise", "max_users": 500},
        )
        with pytest.raises(TenantNotFoundError) as caught:
            await manager.suspend_tenant(tenant.id)
        assert "is the id of tenant 'acme-corp'" in str(caught.value)
        assert "suspend_tenant(tenant_id=...)" in str(caught.value)
        calls: list[Any] = [manager.suspend_tenant, manager.activate_tenant, manager.delete_tenant]
        for call in calls:
            await call(tenant_id=tenant.id)  # the spelling that works
        assert (await manager.get_tenant("acme-corp")).status.value == "deleted"
    finally:
        await manager.close()
