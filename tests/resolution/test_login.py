"""Logging in with the JWT strategy, both ways the docs show: a `jwt` + `header` chain whose
login is a tenant route, and a login on an excluded path. Two tenants each hold a user with
the same email and id and a different password; the issued token reaches only its tenant."""

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware
from fastapi_tenancy.dependencies import CurrentTenant, TokenClaims, make_tenant_db_dependency
from fastapi_tenancy.storage import InMemoryTenantStore
from fastapi_tenancy.tenant import validate_identifier

SECRET = "login-secret-" * 4
PASSWORDS = {"acme": "acme-pw", "globex": "globex-pw"}
NOT_AUTHENTICATED = (401, {"detail": "Not authenticated"})


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(unique=True)
    password: Mapped[str]  # a test stand-in: store a password hash in an application


class Credentials(BaseModel):
    email: str
    password: str


class Login(Credentials):
    tenant: str


def issue(tenant: str, user: User) -> dict[str, str]:
    claims = {"tenant": tenant, "sub": str(user.id), "exp": int(time.time()) + 300}
    return {"access_token": jwt.encode(claims, SECRET, algorithm="HS256")}


async def check(session: AsyncSession, credentials: Credentials) -> User:
    user = await session.scalar(select(User).where(User.email == credentials.email))
    if user is None or user.password != credentials.password:
        raise HTTPException(401, "Incorrect email or password")
    return user


def chained(manager: TenancyManager) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)
    get_db = make_tenant_db_dependency(manager)

    @app.post("/login")
    async def login(
        credentials: Credentials, tenant: CurrentTenant, session: Annotated[AsyncSession, Depends(get_db)]
    ) -> dict[str, str]:
        return issue(tenant.identifier, await check(session, credentials))

    @app.get("/me")
    async def me(tenant: CurrentTenant, claims: TokenClaims) -> dict[str, Any]:
        return {"tenant": tenant.identifier, "sub": claims["sub"]}

    return app


def excluded(manager: TenancyManager) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/auth"])

    @app.post("/auth/login")
    async def login(body: Login) -> dict[str, str]:
        tenant = await manager.get_tenant(validate_identifier(body.tenant))
        async with manager.session(tenant) as session:
            return issue(tenant.identifier, await check(session, body))

    @app.get("/me")
    async def me(tenant: CurrentTenant, claims: TokenClaims) -> dict[str, Any]:
        return {"tenant": tenant.identifier, "sub": claims["sub"]}

    return app


@asynccontextmanager
async def app_on(tmp_path: Path, variant: str) -> AsyncIterator[httpx.AsyncClient]:
    settings: dict[str, Any] = {"jwt_algorithms": ["HS256"], "jwt_secret": SECRET}
    if variant == "chain":
        settings.update(resolution_strategy="chain", resolution_chain=["jwt", "header"])
    else:
        settings.update(resolution_strategy="jwt")
    config = TenancyConfig(database_url=f"sqlite:///{tmp_path}/app.db", **settings)
    manager = TenancyManager(config, InMemoryTenantStore())
    await manager.initialize()
    try:
        for slug, password in (*PASSWORDS.items(), ("sleepy", "sleepy-pw")):
            tenant = await manager.register_tenant(slug, slug.title(), app_metadata=Base.metadata)
            async with manager.session(tenant) as session:
                session.add(User(email="alice@example.com", password=password))
                await session.commit()
        await manager.suspend_tenant("sleepy")
        app = chained(manager) if variant == "chain" else excluded(manager)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            yield client
    finally:
        await manager.close()


async def log_in(client: httpx.AsyncClient, variant: str, tenant: str, password: str) -> httpx.Response:
    credentials = {"email": "alice@example.com", "password": password}
    if variant == "chain":
        return await client.post("/login", json=credentials, headers={"X-Tenant-ID": tenant})
    return await client.post("/auth/login", json={**credentials, "tenant": tenant})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


VARIANTS = ["chain", "excluded"]


@pytest.mark.parametrize("variant", VARIANTS)
async def test_the_token_a_login_issues_reaches_its_tenant_only(tmp_path: Path, variant: str) -> None:
    async with app_on(tmp_path, variant) as client:
        tokens = {}
        for tenant, password in PASSWORDS.items():
            response = await log_in(client, variant, tenant, password)
            assert response.status_code == 200, response.text
            tokens[tenant] = response.json()["access_token"]
            assert jwt.decode(tokens[tenant], SECRET, algorithms=["HS256"])["tenant"] == tenant
        for tenant, token in tokens.items():
            me = await client.get("/me", headers=bearer(token))
            assert me.json() == {"tenant": tenant, "sub": "1"}  # the same id in each tenant's table
        # A token is its tenant's even when a header names another.
        me = await client.get("/me", headers={**bearer(tokens["acme"]), "X-Tenant-ID": "globex"})
        assert me.json()["tenant"] == "acme"


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_login_is_checked_against_its_own_tenants_users(tmp_path: Path, variant: str) -> None:
    async with app_on(tmp_path, variant) as client:
        wrong = await log_in(client, variant, "globex", PASSWORDS["acme"])
        assert (wrong.status_code, wrong.json()) == (401, {"detail": "Incorrect email or password"})


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("tenant", "expected"),
    [
        ("nobody", (404, {"detail": "Tenant not found"})),
        ("Not A Slug!", (404, {"detail": "Tenant not found"})),
        ("acme\x00", (404, {"detail": "Tenant not found"})),
        ("sleepy", (403, {"detail": "Tenant is not active (status: suspended)"})),
    ],
    ids=["unknown", "malformed", "control byte", "suspended"],
)
async def test_a_login_for_a_tenant_that_cannot_be_served_is_refused(
    tmp_path: Path, variant: str, tenant: str, expected: tuple[int, object]
) -> None:
    async with app_on(tmp_path, variant) as client:
        response = await log_in(client, variant, tenant, "sleepy-pw")
    assert (response.status_code, response.json()) == expected


@pytest.mark.parametrize("variant", VARIANTS)
async def test_routes_that_need_the_token_refuse_a_request_without_one(tmp_path: Path, variant: str) -> None:
    async with app_on(tmp_path, variant) as client:
        bare = await client.get("/me")
        header_only = await client.get("/me", headers={"X-Tenant-ID": "acme"})
    # The chain's last word is the header: no tenant named at all is a 400, and a request
    # that named one by header alone is refused by `TokenClaims` instead.
    assert (bare.status_code, bare.json()) == (
        (400, {"detail": "Tenant identifier missing"}) if variant == "chain" else NOT_AUTHENTICATED
    )
    assert (header_only.status_code, header_only.json()) == NOT_AUTHENTICATED
    assert header_only.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("variant", VARIANTS)
async def test_the_docs_show_how_to_log_in_and_then_authorize(tmp_path: Path, variant: str) -> None:
    async with app_on(tmp_path, variant) as client:
        schema = (await client.get("/openapi.json")).json()
    me = schema["paths"]["/me"]["get"]
    login_path = "/login" if variant == "chain" else "/auth/login"
    login = schema["paths"][login_path]["post"]
    assert schema["components"]["securitySchemes"]["TenantToken"]["scheme"] == "bearer"
    if variant == "chain":
        # Either way names the tenant: the header for the login, the token afterwards.
        assert me["security"] == login["security"] == [{"TenantToken": []}, {}]
        assert [(p["name"], p["required"]) for p in login["parameters"]] == [("X-Tenant-ID", False)]
    else:
        assert me["security"] == [{"TenantToken": []}]
        assert "security" not in login and "parameters" not in login  # excluded: the body names the tenant
