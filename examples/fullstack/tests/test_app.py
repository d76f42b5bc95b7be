"""The app as two tenants would use it: login, users, items, and proof that they stay apart."""

import httpx
from fastapi_tenancy import TenancyManager, Tenant
from fastapi_tenancy.testing import assert_isolated, tenant_client

from app.main import app

from .utils import login, superuser


async def test_two_tenants_log_in_and_keep_their_items(
    tenancy_tenant_factory, tenancy_client, tenancy_manager
):
    acme, globex = await tenancy_tenant_factory("acme"), await tenancy_tenant_factory("globex")
    # The same email in both tenants, with different passwords: two different users.
    email = await superuser(tenancy_manager, acme, "acme-password")
    await superuser(tenancy_manager, globex, "globex-password")
    client = tenancy_client()  # the token names the tenant; no header needed
    as_acme = await login(client, acme, email, "acme-password")
    as_globex = await login(client, globex, email, "globex-password")

    # Ids count from 1 in each tenant: the same primary keys, never the same rows.
    created = await client.post("/items/", json={"title": "Anvil", "description": "heavy"}, headers=as_acme)
    assert created.json() == {"title": "Anvil", "description": "heavy", "id": 1, "owner_id": 1}
    created = await client.post("/items/", json={"title": "Globe"}, headers=as_globex)
    assert created.json() == {"title": "Globe", "description": None, "id": 1, "owner_id": 1}
    assert (await client.get("/items/1", headers=as_acme)).json()["title"] == "Anvil"
    assert (await client.get("/items/1", headers=as_globex)).json()["title"] == "Globe"

    renamed = await client.put("/items/1", json={"title": "Rocket"}, headers=as_acme)
    assert renamed.json()["title"] == "Rocket"
    assert (await client.get("/items/", headers=as_globex)).json() == {
        "data": [{"title": "Globe", "description": None, "id": 1, "owner_id": 1}],
        "count": 1,
    }
    assert (await client.delete("/items/1", headers=as_globex)).json() == {
        "message": "Item deleted successfully"
    }
    assert (await client.get("/items/", headers=as_globex)).json() == {"data": [], "count": 0}
    assert (await client.get("/items/", headers=as_acme)).json()["count"] == 1

    me = await client.get("/users/me", headers=as_acme)
    assert (me.json()["tenant"], me.json()["email"], me.json()["is_superuser"]) == ("acme", email, True)


async def test_the_login_refuses_what_it_must(tenancy_tenant_factory, tenancy_client, tenancy_manager):
    acme, globex = await tenancy_tenant_factory(), await tenancy_tenant_factory()
    email = await superuser(tenancy_manager, acme, "acme-password")
    client = tenancy_client()

    def form(tenant: str, password: str = "acme-password") -> dict[str, str]:
        return {"username": email, "password": password, "tenant": tenant}

    wrong = await client.post("/login/access-token", data=form(acme.identifier, "not-the-password"))
    assert (wrong.status_code, wrong.json()) == (400, {"detail": "Incorrect email or password"})
    # acme's admin is nobody in globex.
    assert (await client.post("/login/access-token", data=form(globex.identifier))).status_code == 400
    for tenant in ("nobody", "NOT A SLUG"):
        missing = await client.post("/login/access-token", data=form(tenant))
        assert (missing.status_code, missing.json()) == (404, {"detail": "Tenant not found"})
    await tenancy_manager.suspend_tenant(acme.identifier)
    suspended = await client.post("/login/access-token", data=form(acme.identifier))
    assert suspended.status_code == 403, suspended.text

    anonymous = await client.get("/items/")
    assert (anonymous.status_code, anonymous.headers["www-authenticate"]) == (401, "Bearer")


async def test_users_own_their_items(tenancy_tenant_factory, tenancy_client, tenancy_manager):
    acme = await tenancy_tenant_factory()
    email = await superuser(tenancy_manager, acme, "acme-password")
    client = tenancy_client()
    admin = await login(client, acme, email, "acme-password")
    user = {"email": "bob@example.com", "password": "bob-password", "full_name": "Bob"}
    created = await client.post("/users/", json=user, headers=admin)
    assert created.status_code == 200, created.text
    bob_id = created.json()["id"]
    assert bob_id == 2
    assert (await client.post("/users/", json=user, headers=admin)).status_code == 400  # taken
    bob = await login(client, acme, "bob@example.com", "bob-password")

    for title in ("b", "a"):
        assert (await client.post("/items/", json={"title": title}, headers=bob)).status_code == 200
    admins = await client.post("/items/", json={"title": "admin's"}, headers=admin)
    # Bob sees his own items only, and may not read the admin's; the admin sees all.
    assert [i["title"] for i in (await client.get("/items/", headers=bob)).json()["data"]] == ["b", "a"]
    assert (await client.get(f"/items/{admins.json()['id']}", headers=bob)).status_code == 400
    assert (await client.get("/items/", headers=admin)).json()["count"] == 3
    # The relationship, loaded for the admin; Bob is no superuser.
    owned = await client.get(f"/users/{bob_id}/items", headers=admin)
    assert sorted(i["title"] for i in owned.json()) == ["a", "b"]
    assert (await client.get(f"/users/{bob_id}/items", headers=bob)).status_code == 403


async def test_the_app_is_isolated(tenancy_tenant_factory, tenancy_manager):
    a, b = await tenancy_tenant_factory(), await tenancy_tenant_factory()
    headers: dict[str, dict[str, str]] = {}
    async with tenant_client(app, manager=tenancy_manager) as client:
        for tenant in (a, b):
            email = await superuser(tenancy_manager, tenant, "password-of-" + tenant.identifier)
            headers[tenant.id] = await login(client, tenant, email, "password-of-" + tenant.identifier)

    def as_user(tenant: Tenant) -> httpx.AsyncClient:  # every request with the tenant's token
        return tenant_client(
            app, manager=tenancy_manager, headers=headers[tenant.id], raise_app_exceptions=False
        )

    report = await assert_isolated(app, tenancy_manager, a, b, client=as_user)
    assert "GET /items/{item_id}" in report.routes and "PUT /items/{item_id}" in report.routes
    assert report.skipped == ["GET /health", "POST /login/access-token"]  # excluded paths: not probed


async def test_tenants_registered_with_the_models_start_at_head(tenancy_tenant_factory, tenancy_manager):
    """New tenants get their tables from the models and are stamped: the next upgrade has nothing to do."""
    tenant = await tenancy_tenant_factory()
    schema = tenancy_manager.isolation.storage_name(tenant.identifier)
    assert await _version(tenancy_manager, schema) == "0002"


async def _version(manager: TenancyManager, schema: str) -> str:
    from sqlalchemy import text

    async with manager.engine.connect() as connection:
        query = f'SELECT version_num FROM "{schema}".alembic_version'  # noqa: S608 - the library's name
        return (await connection.execute(text(query))).scalar_one()
