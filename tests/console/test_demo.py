"""`make demo` serves the operator console beside the Quick Start app, behind its demo login."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a process of its own: the Quick Start is imported as `main`, with its settings
# read from the environment when it is imported, as the demo does.
CHECK = """
import asyncio, importlib.util, sys
import httpx

spec = importlib.util.spec_from_file_location("demo", sys.argv[1])
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)
demo._settings()
asyncio.run(demo.register_demo_tenants())

async def main():
    app = demo.build_app()
    login = httpx.BasicAuth(*demo.DEMO_LOGIN)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            print("anonymous", (await client.get("/_tenancy/tenants")).status_code)
            wrong = httpx.BasicAuth(demo.DEMO_LOGIN[0], "guess")
            print("wrong password", (await client.get("/_tenancy/tenants", auth=wrong)).status_code)
            for tenant in ("acme-corp", "umbrella"):
                print(tenant, (await client.get("/orders", headers={"X-Tenant-ID": tenant})).status_code)
            page = await client.get("/_tenancy/tenants", auth=login)
            print("tenants", page.status_code, page.text.count('<td><a href="/_tenancy/tenants/'))
            suspended = await client.get("/_tenancy/tenants?status=suspended", auth=login)
            print("suspended", suspended.text.count('<td><a href="/_tenancy/tenants/umbrella"'))
            traffic = await client.get("/_tenancy/traffic", auth=login)
            print("traffic", traffic.status_code, '<a href="/_tenancy/tenants/acme-corp">' in traffic.text)
            fleet = await client.get("/_tenancy/fleet", auth=login)
            print("fleet", fleet.status_code, "Fleet migrations need PostgreSQL." in fleet.text)

asyncio.run(main())
"""


def test_the_demo_serves_the_console_behind_its_login(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}
    env["TENANCY_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(ROOT / "scripts" / "demo.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "anonymous 401",
        "wrong password 401",
        "acme-corp 200",
        "umbrella 403",
        "tenants 200 4",
        "suspended 1",
        "traffic 200 True",
        "fleet 200 True",
    ], result.stdout + result.stderr
