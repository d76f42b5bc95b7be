"""The deployment path, end to end on PostgreSQL: the registry in the database, tenants made by
the CLI and migrated through both revisions, down and up again, then logged in and used."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fastapi_tenancy.storage.database import SQLAlchemyTenantStore
from fastapi_tenancy.testing import retarget, retargeted_config, tenant_client
from sqlalchemy import text

from app.initial_data import create_first_superuser
from app.main import app, manager

from .utils import login

PROJECT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "fastapi-tenancy"


def run(url: str, *args: str, status: int = 0) -> str:
    """A command of the project, with the app's settings and the test database; its output."""
    env = {**os.environ, "TENANCY_DATABASE_URL": url}
    done = subprocess.run(
        args, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == status, done.stdout + done.stderr
    return done.stdout


async def columns(table: str, schema: str) -> list[str]:
    async with manager.engine.connect() as connection:
        query = (
            "SELECT column_name FROM information_schema.columns WHERE table_schema = :s AND table_name = :t"
        )
        rows = await connection.execute(text(query + " ORDER BY ordinal_position"), {"s": schema, "t": table})
        return list(rows.scalars())


async def test_tenants_created_migrated_and_served(tenancy_postgres_url):
    cli = (str(CLI), "--app", "app.main:manager")
    for slug in ("initech", "umbrella"):
        # No template, no models: the registration runs both revisions (alembic_config).
        run(tenancy_postgres_url, *cli, "tenants", "create", slug)
    assert json.loads(run(tenancy_postgres_url, *cli, "--json", "migrate", "status")) == [
        {"tenant": "initech", "schema": "tenant_initech", "revision": "0002", "at_target": True},
        {"tenant": "umbrella", "schema": "tenant_umbrella", "revision": "0002", "at_target": True},
    ]
    run(tenancy_postgres_url, *cli, "migrate", "downgrade", "0001", "--tenant", "initech")
    behind = run(tenancy_postgres_url, *cli, "--json", "migrate", "status", "--tenant", "initech", status=1)
    assert [row["revision"] for row in json.loads(behind)] == ["0001"]
    run(tenancy_postgres_url, *cli, "migrate", "upgrade")  # initech back to head; umbrella is there
    superuser = ("initech", "admin@initech.com", "initech-pw")
    run(tenancy_postgres_url, sys.executable, "-m", "app.initial_data", *superuser)  # the script, by hand

    # The app on that registry and database, as the server would run it.
    config = retargeted_config(manager.config, database_url=tenancy_postgres_url)
    async with retarget(manager, config, store=SQLAlchemyTenantStore(tenancy_postgres_url)):
        await manager.initialize()
        await create_first_superuser(manager, "umbrella", "admin@umbrella.com", "umb-pw")
        for schema in ("tenant_initech", "tenant_umbrella"):
            assert await columns("item", schema) == ["title", "id", "owner_id", "description"]
        async with tenant_client(app, manager=manager) as client:
            initech = await login(client, "initech", "admin@initech.com", "initech-pw")
            umbrella = await login(client, "umbrella", "admin@umbrella.com", "umb-pw")
            item = {"title": "TPS report", "description": "with the new cover sheet"}
            created = await client.post("/items/", json=item, headers=initech)
            assert created.json() == {**item, "id": 1, "owner_id": 1}
            assert (await client.get("/items/", headers=umbrella)).json() == {"data": [], "count": 0}
            assert (await client.get("/items/1", headers=umbrella)).status_code == 404
            read = await client.get("/items/1", headers=initech)
            assert read.json()["description"] == item["description"]
