"""`make demo`: the Quick Start app on the embedded SQLite default, with two demo tenants.

Serves http://127.0.0.1:8000 and prints curl commands to try. Data lives in
`.demo/` (delete it to start over); set TENANCY_DATABASE_URL to use PostgreSQL.
"""

import asyncio
import os
import sys
from pathlib import Path

import uvicorn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart"
DEMO_TENANTS = {"acme-corp": "Acme Corporation", "globex": "Globex Inc."}


async def register_demo_tenants() -> None:
    from main import Base, Order, manager  # the Quick Start's own module

    from fastapi_tenancy import TenantNotFoundError

    await manager.initialize()
    for identifier, name in DEMO_TENANTS.items():
        try:
            await manager.get_tenant(identifier)
        except TenantNotFoundError:
            tenant = await manager.register_tenant(identifier, name, app_metadata=Base.metadata)
            async with manager.session(tenant) as session:
                session.add(Order(description=f"Welcome order of {name}"))
                await session.commit()
    await manager.close()


def main() -> None:
    data = ROOT / ".demo"
    data.mkdir(exist_ok=True)
    os.environ.setdefault("TENANCY_DATABASE_URL", f"sqlite+aiosqlite:///{data / 'demo.db'}")
    sys.path.insert(0, str(EXAMPLE))
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
  open {url}/docs                                       # no tenant needed

Press Ctrl+C to stop.
""",
        flush=True,
    )
    uvicorn.run("main:app", host="127.0.0.1", port=8000, app_dir=str(EXAMPLE), log_level="info")


if __name__ == "__main__":
    main()
