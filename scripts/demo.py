"""`make demo`: the Quick Start app on the embedded SQLite default, demo tenants and the operator console.

Serves http://127.0.0.1:8000 and prints curl commands to try; the operator console is at
http://127.0.0.1:8000/_tenancy/ (log in as `operator`, password `demo`). Data lives in
`.demo/` (delete it to start over); set TENANCY_DATABASE_URL to use PostgreSQL.

The Quick Start's `main.py` is the user's code, kept as written: the console is mounted
beside it, in an app of its own that routes `/_tenancy` to the console and everything
else to the Quick Start, so tenant requests never reach the console, nor console
requests `TenancyMiddleware`.
"""

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import uvicorn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart"
DEMO_TENANTS = {
    "acme-corp": ("Acme Corporation", "pro"),
    "globex": ("Globex Inc.", "free"),
    "initech": ("Initech", "free"),
    "umbrella": ("Umbrella Corp", "pro"),
}
DEMO_LOGIN = ("operator", "demo")
"""The console's demo login (HTTP Basic). A real deployment brings its own auth dependency."""


def _settings() -> None:
    """The demo's defaults, before the Quick Start builds its TenancyConfig from the environment."""
    data = ROOT / ".demo"
    data.mkdir(exist_ok=True)
    os.environ.setdefault("TENANCY_DATABASE_URL", f"sqlite+aiosqlite:///{data / 'demo.db'}")
    # Limits low enough to see 429s on the console's traffic page with a few curls.
    os.environ.setdefault("TENANCY_RATE_LIMIT_ENABLED", "true")
    os.environ.setdefault("TENANCY_RATE_LIMIT_REQUESTS", "30")
    os.environ.setdefault("TENANCY_RATE_LIMIT_PLANS", '{"pro": 120}')
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))


async def register_demo_tenants() -> None:
    from main import Base, Order, manager  # the Quick Start's own module

    from fastapi_tenancy import TenantNotFoundError

    await manager.initialize()
    try:
        for identifier, (name, plan) in DEMO_TENANTS.items():
            try:
                await manager.get_tenant(identifier)
            except TenantNotFoundError:
                tenant = await manager.register_tenant(
                    identifier, name, app_metadata=Base.metadata, metadata={"plan": plan}
                )
                async with manager.session(tenant) as session:
                    session.add(Order(description=f"Welcome order of {name}"))
                    await session.commit()
                if identifier == "umbrella":
                    await manager.suspend_tenant(identifier)
    finally:
        await manager.close()


def build_app() -> Any:
    """The Quick Start app with the operator console beside it, behind the demo login."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from main import Base, app, manager  # the Quick Start's own module
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from fastapi_tenancy.metrics import TenantMetrics, TenantMetricsMiddleware

    basic = HTTPBasic(realm="fastapi-tenancy demo console")

    def demo_login(credentials: Annotated[HTTPBasicCredentials, Depends(basic)]) -> str:
        user_ok = secrets.compare_digest(credentials.username, DEMO_LOGIN[0])
        password_ok = secrets.compare_digest(credentials.password, DEMO_LOGIN[1])
        if not (user_ok and password_ok):
            raise HTTPException(401, "Unknown operator", headers={"WWW-Authenticate": "Basic"})
        return credentials.username

    metrics = TenantMetrics(registry=CollectorRegistry())
    metrics.count_refusals(manager.rate_limiter)
    console = manager.console(auth=demo_login, metrics=metrics, app_metadata=Base.metadata)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Mounted apps get no lifespan of their own: the Quick Start's runs here.
        await manager.initialize()
        try:
            yield
        finally:
            await console.close()
            await manager.close()

    return Starlette(
        routes=[Mount("/_tenancy", console), Mount("/", TenantMetricsMiddleware(app, metrics=metrics))],
        lifespan=lifespan,
    )


def main() -> None:
    _settings()
    asyncio.run(register_demo_tenants())
    url = "http://127.0.0.1:8000"
    print(
        f"""
fastapi-tenancy demo: the Quick Start app with tenants {", ".join(DEMO_TENANTS)}
Try, in another terminal:

  curl -X POST "{url}/orders?description=First+order" -H "X-Tenant-ID: acme-corp"
  curl "{url}/orders" -H "X-Tenant-ID: acme-corp"
  curl "{url}/orders" -H "X-Tenant-ID: globex"          # globex sees only its own orders
  curl -i "{url}/orders"                                # 400 Tenant identifier missing
  curl -i "{url}/orders" -H "X-Tenant-ID: nobody"       # 404 Tenant not found
  curl -i "{url}/orders" -H "X-Tenant-ID: umbrella"     # 403 suspended
  open {url}/docs                                       # no tenant needed

The operator console: {url}/_tenancy/  (login {DEMO_LOGIN[0]}, password {DEMO_LOGIN[1]})
Press Ctrl+C to stop.
""",
        flush=True,
    )
    uvicorn.run(build_app(), host="127.0.0.1", port=8000, log_level="info")


if __name__ == "__main__":
    main()
