"""What the tests do again and again: log in, make a tenant's first superuser."""

import httpx
from fastapi_tenancy import TenancyManager, Tenant

from app.initial_data import create_first_superuser


async def login(client: httpx.AsyncClient, tenant: Tenant | str, email: str, password: str) -> dict[str, str]:
    """The Authorization header of `email`'s token in `tenant`, from the login route."""
    identifier = tenant if isinstance(tenant, str) else tenant.identifier
    form = {"username": email, "password": password, "tenant": identifier}
    response = await client.post("/login/access-token", data=form)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def superuser(manager: TenancyManager, tenant: Tenant, password: str) -> str:
    """The tenant's first superuser (the same email in every tenant); its email."""
    user = await create_first_superuser(manager, tenant.identifier, "admin@example.com", password)
    return user.email
