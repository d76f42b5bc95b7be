"""`/openapi.json` through `TenancyMiddleware`: every tenant operation shows how to name the tenant
(the header, the path segment, the bearer scheme, the tenant's host), excluded paths show
nothing, and a request built from the served schema alone, as Swagger UI's "Try it out"
builds it, reaches the tenant. `app.openapi()` stays the app's own."""

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import jwt
import pytest
import schemathesis
from fastapi import Depends, FastAPI, Header
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.security import OAuth2PasswordBearer
from starlette.requests import HTTPConnection

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware, middleware
from fastapi_tenancy.dependencies import CurrentTenant
from fastapi_tenancy.openapi import tenant_openapi
from fastapi_tenancy.storage import InMemoryTenantStore

from .swagger import MissingInput, try_it_out

SECRET = "openapi-secret-" * 3
JWT: dict[str, Any] = {"jwt_algorithms": ["HS256"], "jwt_secret": SECRET}
HEADER = {"name": "X-Tenant-ID", "in": "header", "required": True, "schema": {"type": "string"}}
PATH = {"name": "tenant", "in": "path", "required": True, "schema": {"type": "string"}}
BEARER = {"TenantToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
TYPED = {"X-Tenant-ID": "acme", "tenant": "acme", "order_id": "7"}


def token(tenant: str = "acme") -> str:
    return jwt.encode({"tenant": tenant, "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")


def routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.post("/auth/login")
    async def login() -> str:
        return "a token"

    @app.get("/whoami")
    async def whoami(tenant: CurrentTenant) -> str:
        return tenant.identifier

    @app.get("/orders/{order_id}")
    async def order(order_id: int, tenant: CurrentTenant) -> dict[str, Any]:
        return {"tenant": tenant.identifier, "order": order_id}


@asynccontextmanager
async def served(
    settings: dict[str, Any],
    *,
    resolver: Any = None,
    customise: Callable[[FastAPI], None] = routes,
    root_path: str = "",
    **options: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    manager = TenancyManager(
        TenancyConfig(database_url="sqlite://", **settings), InMemoryTenantStore(), resolver=resolver
    )
    await manager.initialize()
    await manager.register_tenant("acme", "Acme")
    app = FastAPI()
    customise(app)
    app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/health", "/auth"], **options)
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as client:
            yield client, app
    finally:
        await manager.close()


async def schema_of(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    body: dict[str, Any] = response.json()
    schemathesis.openapi.from_dict(body).validate()  # still a valid OpenAPI document
    return body


def without_descriptions(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_descriptions(v) for k, v in value.items() if k != "description"}
    if isinstance(value, list):
        return [without_descriptions(v) for v in value]
    return value


def tenancy_parameters(operation: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameters of an operation that the app did not declare itself."""
    own = {"order_id"}
    return [without_descriptions(p) for p in operation.get("parameters", []) if p["name"] not in own]


async def test_header_strategy() -> None:
    async with served({}) as (client, app):
        schema = await schema_of(client)
        own = app.openapi()
    for path, method in (("/whoami", "get"), ("/orders/{order_id}", "get")):
        assert tenancy_parameters(schema["paths"][path][method]) == [HEADER]
        assert schema["paths"][path][method]["parameters"][0]["name"] == "X-Tenant-ID"  # shown first
        assert "security" not in schema["paths"][path][method]
    for excluded in ("/health", "/auth/login"):
        assert schema["paths"][excluded] == own["paths"][excluded]
    assert "securitySchemes" not in schema.get("components", {})


async def test_the_configured_header_name_is_the_one_documented() -> None:
    async with served({"tenant_header_name": "X-Org"}) as (client, _):
        schema = await schema_of(client)
    assert tenancy_parameters(schema["paths"]["/whoami"]["get"]) == [{**HEADER, "name": "X-Org"}]


@pytest.mark.parametrize(
    ("prefix", "key"), [("/t", "/t/{tenant}"), ("", "/{tenant}"), ("/api/orgs", "/api/orgs/{tenant}")]
)
async def test_path_strategy_moves_tenant_routes_under_the_prefix(prefix: str, key: str) -> None:
    async with served({"resolution_strategy": "path", "path_prefix": prefix}) as (client, _):
        schema = await schema_of(client)
    assert list(schema["paths"]) == ["/health", "/auth/login", f"{key}/whoami", f"{key}/orders/{{order_id}}"]
    assert tenancy_parameters(schema["paths"][f"{key}/whoami"]["get"]) == [PATH]


async def test_subdomain_strategy_offers_this_host_and_the_tenants_host() -> None:
    async with served({"resolution_strategy": "subdomain", "domain_suffix": "example.com"}) as (client, _):
        schema = await schema_of(client)
    servers = schema["paths"]["/whoami"]["servers"]
    assert [server["url"] for server in servers] == ["/", "{scheme}://{tenant}.example.com"]
    assert servers[1]["variables"]["scheme"] == {"enum": ["https", "http"], "default": "https"}
    assert "servers" not in schema["paths"]["/health"] and "servers" not in schema
    assert "parameters" not in schema["paths"]["/whoami"]["get"]


@pytest.mark.parametrize(
    ("suffix", "urls"),
    [
        ("example.com", ["/", "{scheme}://{tenant}.example.com", "{scheme}://{domain}"]),
        (None, ["/", "{scheme}://{domain}"]),
    ],
)
async def test_domain_strategy_offers_this_host_the_tenants_subdomain_and_its_domains(
    suffix: str | None, urls: list[str]
) -> None:
    async with served({"resolution_strategy": "domain", "domain_suffix": suffix}) as (client, app):
        manager = app.user_middleware[0].kwargs["manager"]
        assert isinstance(manager, TenancyManager)
        await manager.add_domain("acme", "acme.com")
        schema = await schema_of(client)
        servers = schema["paths"]["/whoami"]["servers"]
        assert [server["url"] for server in servers] == urls
        assert servers[-1]["variables"]["domain"]["default"] == "tenant.example"
        assert (
            "servers" not in schema["paths"]["/health"]
            and "parameters" not in schema["paths"]["/whoami"]["get"]
        )
        # "Try it out" on the tenant's own domain reaches it.
        request = try_it_out(
            schema, "/orders/{order_id}", "get", {**TYPED, "domain": "acme.com"}, server=len(urls) - 1
        )
        response = await client.send(request)
        assert (response.status_code, response.json()) == (200, {"tenant": "acme", "order": 7}), request


async def test_jwt_strategy_declares_a_bearer_scheme_for_the_authorize_dialog() -> None:
    async with served({"resolution_strategy": "jwt", **JWT}) as (client, _):
        schema = await schema_of(client)
    assert without_descriptions(schema["components"]["securitySchemes"]) == BEARER
    assert schema["paths"]["/whoami"]["get"]["security"] == [{"TenantToken": []}]
    assert "security" not in schema["paths"]["/health"]["get"]
    assert "security" not in schema["paths"]["/auth/login"]["post"]


async def test_a_first_mode_chain_documents_each_way_as_optional() -> None:
    settings = {"resolution_strategy": "chain", "resolution_chain": ["jwt", "header"], **JWT}
    async with served(settings) as (client, _):
        schema = await schema_of(client)
    operation = schema["paths"]["/whoami"]["get"]
    assert tenancy_parameters(operation) == [{**HEADER, "required": False}]
    assert operation["security"] == [{"TenantToken": []}, {}]  # `{}`: no token is fine too


async def test_an_agree_mode_chain_requires_every_way() -> None:
    settings = {
        "resolution_strategy": "chain",
        "resolution_chain": ["path", "header"],
        "resolution_chain_mode": "agree",
    }
    async with served(settings) as (client, _):
        schema = await schema_of(client)
    assert tenancy_parameters(schema["paths"]["/t/{tenant}/whoami"]["get"]) == [PATH, HEADER]


async def test_a_custom_resolver_that_says_nothing_adds_nothing() -> None:
    async def from_query(connection: HTTPConnection) -> str | None:
        return connection.query_params.get("tenant")

    async with served({"resolution_strategy": "custom"}, resolver=from_query) as (client, app):
        assert (await client.get("/openapi.json")).json() == app.openapi()


# -- "Try it out": the request built from the served schema alone -------------------------


@pytest.mark.parametrize(
    ("settings", "path", "server"),
    [
        ({}, "/orders/{order_id}", 0),
        ({"resolution_strategy": "path"}, "/t/{tenant}/orders/{order_id}", 0),
        ({"resolution_strategy": "subdomain", "domain_suffix": "example.com"}, "/orders/{order_id}", 1),
        ({"resolution_strategy": "domain", "domain_suffix": "example.com"}, "/orders/{order_id}", 1),
        ({"resolution_strategy": "jwt", **JWT}, "/orders/{order_id}", 0),
        (
            {"resolution_strategy": "chain", "resolution_chain": ["jwt", "header"], **JWT},
            "/orders/{order_id}",
            0,
        ),
    ],
    ids=["header", "path", "subdomain", "domain", "jwt", "jwt-then-header"],
)
async def test_try_it_out_reaches_the_tenant(settings: dict[str, Any], path: str, server: int) -> None:
    authorized = {"TenantToken": token()}
    async with served(settings) as (client, app):
        schema = await schema_of(client)
        request = try_it_out(schema, path, "get", TYPED, authorized=authorized, server=server)
        response = await client.send(request)
        assert (response.status_code, response.json()) == (200, {"tenant": "acme", "order": 7}), request
        # The app's own schema is not enough: the form lacks the tenant, or the request is refused.
        own = app.openapi()
        own_path = "/orders/{order_id}"
        try:
            bare = try_it_out(own, own_path, "get", TYPED, authorized=authorized)
        except MissingInput:
            return
        # (The domain strategy looks the docs' own host up: no tenant has it, 404.)
        assert (await client.send(bare)).status_code in (400, 401, 404)


async def test_try_it_out_asks_for_the_tenant_before_sending() -> None:
    async with served({}) as (client, _):
        schema = await schema_of(client)
    with pytest.raises(MissingInput, match="X-Tenant-ID"):
        try_it_out(schema, "/whoami", "get", {})
    async with served({"resolution_strategy": "jwt", **JWT}) as (client, _):
        schema = await schema_of(client)
    with pytest.raises(MissingInput, match="authorized"):
        try_it_out(schema, "/whoami", "get", {})


# -- living with the app's own OpenAPI ----------------------------------------------------


async def test_the_apps_own_schema_is_untouched() -> None:
    async with served({}) as (client, app):
        before = app.openapi()
        await schema_of(client)
        assert app.openapi() == before
        assert "parameters" not in app.openapi()["paths"]["/whoami"]["get"]


async def test_a_customised_app_openapi_is_served_with_the_tenant() -> None:
    def customise(app: FastAPI) -> None:
        routes(app)
        generate = app.openapi

        def custom_openapi() -> dict[str, Any]:
            if app.openapi_schema:
                return app.openapi_schema
            schema = generate()
            schema["info"]["x-logo"] = {"url": "https://example.com/logo.png"}
            app.openapi_schema = schema
            return schema

        app.openapi = custom_openapi  # type: ignore[method-assign]

    async with served({}, customise=customise) as (client, app):
        schema = await schema_of(client)
        assert schema["info"]["x-logo"] == {"url": "https://example.com/logo.png"}
        assert tenancy_parameters(schema["paths"]["/whoami"]["get"]) == [HEADER]
        # Replaced again after the app has started: still what is served.
        previous = app.openapi

        def second_version() -> dict[str, Any]:
            return {**previous(), "info": {"title": "v2", "version": "2"}}

        app.openapi = second_version  # type: ignore[method-assign]
        schema = await schema_of(client)
        assert schema["info"]["title"] == "v2"
        assert tenancy_parameters(schema["paths"]["/whoami"]["get"]) == [HEADER]


async def test_what_the_app_declares_itself_is_not_doubled() -> None:
    # An absolute URL: the strict validator of schema_of() takes no relative tokenUrl.
    oauth2 = OAuth2PasswordBearer(tokenUrl="http://app.test/auth/login")

    def customise(app: FastAPI) -> None:
        routes(app)

        @app.get("/declared")
        async def declared(
            tenant: CurrentTenant,
            x_tenant_id: Annotated[str, Header()],
            bearer: Annotated[str, Depends(oauth2)],
        ) -> str:
            return tenant.identifier

    settings = {"resolution_strategy": "chain", "resolution_chain": ["jwt", "header"], **JWT}
    async with served(settings, customise=customise) as (client, _):
        schema = await schema_of(client)
    operation = schema["paths"]["/declared"]["get"]
    assert [p["name"] for p in operation["parameters"]] == ["x-tenant-id"]  # FastAPI's spelling, once
    assert operation["security"] == [{"OAuth2PasswordBearer": []}]  # that token is the tenant's
    assert schema["paths"]["/whoami"]["get"]["security"] == [{"TenantToken": []}, {}]


async def test_openapi_false_serves_the_apps_schema() -> None:
    async with served({}, openapi=False) as (client, app):
        assert (await client.get("/openapi.json")).json() == app.openapi()


async def test_behind_a_root_path() -> None:
    async with served({}, root_path="/api") as (client, _):
        response = await client.get("/api/openapi.json")
        schema = response.json()
    assert schema["servers"] == [{"url": "/api"}]  # FastAPI's own entry, kept
    assert tenancy_parameters(schema["paths"]["/whoami"]["get"]) == [HEADER]
    settings = {"resolution_strategy": "subdomain", "domain_suffix": "example.com"}
    async with served(settings, root_path="/api") as (client, _):
        schema = (await client.get("/api/openapi.json")).json()
    assert [s["url"] for s in schema["paths"]["/whoami"]["servers"]] == [
        "/api",
        "{scheme}://{tenant}.example.com/api",
    ]


async def test_when_the_docs_are_not_excluded_the_schema_needs_a_tenant_too() -> None:
    async with served({}, exclude_docs=False) as (client, _):
        assert (await client.get("/openapi.json")).status_code == 400
        response = await client.get("/openapi.json", headers={"X-Tenant-ID": "acme"})
    assert tenancy_parameters(response.json()["paths"]["/whoami"]["get"]) == [HEADER]


async def test_a_compressing_middleware_inside_does_not_hide_the_schema() -> None:
    def customise(app: FastAPI) -> None:
        routes(app)
        app.add_middleware(GZipMiddleware, minimum_size=10)  # added first: inside TenancyMiddleware

        @app.get("/long")
        async def long(tenant: CurrentTenant) -> str:
            return tenant.identifier * 100

    async with served({}, customise=customise) as (client, _):
        schema = await schema_of(client)  # httpx asks for gzip: the schema comes uncompressed
        assert tenancy_parameters(schema["paths"]["/whoami"]["get"]) == [HEADER]
        other = await client.get("/long", headers={"X-Tenant-ID": "acme"})
        assert other.headers["content-encoding"] == "gzip"  # every other response as before


async def test_the_schema_is_documented_once_per_version(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(schema: Any, resolver: Any, **options: Any) -> dict[str, Any]:
        calls.append(schema["info"]["title"])
        return tenant_openapi(schema, resolver, **options)

    monkeypatch.setattr(middleware, "tenant_openapi", counting)
    async with served({}) as (client, app):
        first = await client.get("/openapi.json")
        assert (await client.get("/openapi.json")).content == first.content
        assert calls == ["FastAPI"]
        app.title = "Renamed"
        app.openapi_schema = None  # the app's schema changes: documented again
        await client.get("/openapi.json")
        assert calls == ["FastAPI", "Renamed"]
