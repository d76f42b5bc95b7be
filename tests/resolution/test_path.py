"""Path resolution: `/t/{tenant}/...` with routes written without the tenant segment."""

import json

import pytest

from fastapi_tenancy.resolution import PathResolver

from ..asgi import http_raw, websocket
from .conftest import Build, accepted_as

MISSING = (400, {"detail": "Tenant identifier missing"})
INVALID = (400, {"detail": "Tenant path invalid"})
NOT_FOUND = (404, {"detail": "Tenant not found"})


async def test_routes_see_the_path_without_the_tenant_and_urls_stay_right(build: Build) -> None:
    async with build(resolution_strategy="path") as (client, _, _):
        response = await client.get("/t/acme/whoami")
        assert response.status_code == 200, response.text
        assert response.json() == {
            "tenant": "acme",
            "url": "http://app.test/t/acme/whoami",
            "url_for": "http://app.test/t/acme/whoami",
            "root_path": "/t/acme",
        }
        assert (await client.get("/t/globex/admin")).json() == "admin of globex"
        # Without the prefix there is no tenant, and the tenant-less route is not reached.
        assert ((r := await client.get("/whoami")).status_code, r.json()) == MISSING
        assert (await client.get("/health")).json() == "ok"


async def test_a_server_root_path_is_kept_in_front(build: Build) -> None:
    async with build(resolution_strategy="path") as (_, app, _):
        status, body = await http_raw(app, "/api/t/acme/whoami", root_path="/api")
    assert status == 200, body
    assert json.loads(body)["url_for"] == "http://app.test/api/t/acme/whoami"
    assert json.loads(body)["root_path"] == "/api/t/acme"


@pytest.mark.parametrize(
    ("path", "raw_path", "expected"),
    [
        ("/t/../admin", None, INVALID),
        ("/t/../admin", b"/t/%2e%2e/admin", INVALID),
        ("/t/../admin", b"/t/%2E%2E/admin", INVALID),
        ("/t/./acme/whoami", None, INVALID),
        ("/t/acme/../admin", None, INVALID),
        ("/t/acme/./whoami", None, INVALID),
        ("/t/acme/..", None, INVALID),
        ("/t/acme/whoami", b"/t/acme%2Fwhoami", INVALID),
        ("/t/globex/whoami", b"/t/acme%2f..%2fglobex/whoami", INVALID),
        ("/t/..", None, INVALID),
        ("/t/acme\\..\\globex/whoami", None, NOT_FOUND),
        ("/t/%2e%2e/admin", b"/t/%252e%252e/admin", NOT_FOUND),  # decoded once: not a dot segment
        ("/t//admin", None, MISSING),
        ("/t/", None, MISSING),
        ("/t", None, MISSING),
        ("/tx/acme/whoami", None, MISSING),
        ("//t/acme/whoami", None, MISSING),
        ("/admin", None, MISSING),
        ("/T/acme/whoami", None, MISSING),
        ("/t/ACME/whoami", None, NOT_FOUND),
        ("/t/acme\x00/whoami", None, NOT_FOUND),
        ("/t/" + "a" * (1 << 20) + "/whoami", None, NOT_FOUND),
        ("/t/unknown-co/whoami", None, NOT_FOUND),
        ("/t/sleepy/whoami", None, (403, {"detail": "Tenant is not active (status: suspended)"})),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, str | bytes) else None,
)
async def test_hostile_paths_never_resolve_or_reach_another_route(
    build: Build, path: str, raw_path: bytes | None, expected: tuple[int, object]
) -> None:
    async with build(resolution_strategy="path") as (_, app, _):
        status, body = await http_raw(app, path, raw_path)
    assert (status, json.loads(body)) == expected


async def test_percent_encoded_letters_name_the_same_tenant(build: Build) -> None:
    # The server decodes `%61cme` to `acme`; the tenant is the same one a plain path names.
    async with build(resolution_strategy="path") as (_, app, _):
        status, body = await http_raw(app, "/t/acme/whoami", b"/t/%61cme/whoami")
    assert (status, json.loads(body)["tenant"]) == (200, "acme")


@pytest.mark.parametrize(
    ("prefix", "url"),
    [("/tenants", "/tenants/acme/whoami"), ("/api/orgs", "/api/orgs/acme/whoami"), ("", "/acme/whoami")],
)
async def test_the_prefix_is_configurable(build: Build, prefix: str, url: str) -> None:
    async with build(resolution_strategy="path", path_prefix=prefix) as (client, _, _):
        response = await client.get(url)
    assert response.status_code == 200, response.text
    assert response.json()["url_for"] == f"http://app.test{url}"


async def test_websockets_resolve_by_path(build: Build) -> None:
    async with build(resolution_strategy="path") as (_, app, _):
        assert accepted_as(await websocket(app, [], path="/t/acme/ws")) == "acme"
        assert accepted_as(await websocket(app, [], path="/t/../ws")) is None
        refused = await websocket(app, [], path="/ws")
        assert refused == [{"type": "websocket.close", "code": 1008, "reason": "Tenant identifier missing"}]


@pytest.mark.parametrize("prefix", ["t", "/t/", "/t/../x", "/t x", "/t//x"])
def test_invalid_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        PathResolver(prefix)
