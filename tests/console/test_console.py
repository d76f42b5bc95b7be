"""The operator console over HTTP: auth on everything, CSRF, escaping, the actions and what they audit."""

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_tenancy import (
    ConfigurationError,
    TenancyConfig,
    TenancyManager,
    TenantNotFoundError,
    TenantStatus,
)
from fastapi_tenancy.audit import SQLAuditWriter
from fastapi_tenancy.console.csrf import COOKIE, CSRFGuard

from ..apps import Base, build_app
from .conftest import HOSTILE, Site, mount

PAGES = ["/", "/static/console.css", "/tenants", "/tenants/acme", "/fleet", "/fleet/revisions"]
PAGES += ["/fleet/runs/0123abcd", "/traffic", "/doctor"]
ACTIONS = [
    "/tenants/acme/suspend",
    "/tenants/acme/activate",
    "/tenants/acme/delete",
    "/tenants/acme/move",
    "/fleet/upgrade",
]


async def _history(site: Site, identifier: str) -> list[tuple[str, str]]:
    audit = site.manager.events.audit
    assert isinstance(audit, SQLAuditWriter)
    tenant = await site.manager.get_tenant(identifier)
    return [(entry.event, entry.actor) for entry in await audit.entries(tenant_id=tenant.id)]


# -- who may use it -----------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "alice"], ids=["missing", "not-callable"])
def test_the_console_refuses_to_exist_without_an_auth_dependency(tmp_path: Path, auth: Any) -> None:
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    with pytest.raises(ConfigurationError, match="auth"):
        manager.console(auth=auth)


async def test_no_page_and_no_action_without_the_operator(site: Site) -> None:
    token = await site.token("alice")
    for operator in (None, "mallory"):
        headers = {} if operator is None else {"X-Operator": operator}
        for path in PAGES:
            response = await site.client.get(f"/_tenancy{path}", headers=headers)
            # The app's own auth answered, as it made the answer (with its challenge).
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == "Operator"
            assert "acme" not in response.text.lower()
        for path in ACTIONS:
            form = {"csrf": token, "confirm": "acme", "tier": "rls"}
            response = await site.client.post(f"/_tenancy{path}", data=form, headers=headers)
            assert response.status_code == 401, (path, response.text)
    assert (await site.manager.get_tenant("acme")).status is TenantStatus.ACTIVE
    assert site.console.fleet.job is None


async def test_an_auth_that_returns_no_operator_is_refused_and_a_wrong_type_is_a_bug(tmp_path: Path) -> None:
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    await manager.initialize()
    try:
        for returned, expected in [(None, 403), ("", 403), ({"name": "alice"}, TypeError)]:
            app = build_app(manager, excluded_paths=("/_tenancy",))
            console = manager.console(auth=lambda returned=returned: returned)
            app.mount("/_tenancy", console)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            ) as client:
                if expected is TypeError:
                    with pytest.raises(TypeError, match="must return the operator's name"):
                        await client.get("/_tenancy/tenants")
                else:
                    assert (await client.get("/_tenancy/tenants")).status_code == expected
    finally:
        await manager.close()


async def test_the_console_is_not_served_inside_a_tenant_request(site: Site) -> None:
    # Mounted without excluding its path: TenancyMiddleware resolves a tenant first.
    app = build_app(site.manager)
    app.mount("/_tenancy", site.console)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        inside = await client.get("/_tenancy/tenants", headers={"X-Tenant-ID": "acme", "X-Operator": "alice"})
        outside = await client.get("/_tenancy/tenants", headers={"X-Operator": "alice"})
    assert inside.status_code == 404
    assert "excluded_paths" in inside.text and "Acme" not in inside.text
    assert outside.status_code == 400  # the middleware's refusal: no tenant named


# -- what every page is -------------------------------------------------------------------


async def test_every_page_is_html_without_script_and_with_its_guards(site: Site) -> None:
    for path in PAGES:
        if path in ("/", "/fleet/runs/0123abcd"):
            continue
        response = await site.page(path)
        assert response.status_code == 200, response.text
        policy = response.headers["content-security-policy"]
        assert (
            "default-src 'none'" in policy
            and "frame-ancestors 'none'" in policy
            and "script-src" not in policy
        )
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        if path != "/static/console.css":
            assert response.headers["content-type"].startswith("text/html")
            assert "<script" not in response.text.replace("&lt;script", "")
            assert "Operator: <strong>alice</strong>" in response.text


async def test_the_csrf_cookie_is_strict_httponly_and_only_for_the_console(site: Site) -> None:
    response = await site.page("/tenants")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for attribute in ("HttpOnly", "Path=/_tenancy/", "SameSite=strict"):
        assert attribute.lower() in cookie.lower(), cookie
    again = await site.page("/tenants")
    assert "set-cookie" not in again.headers  # kept, not replaced on every page


async def test_hostile_tenant_strings_are_shown_as_text(site: Site) -> None:
    plan = HOSTILE.replace("&", "%26").replace("#", "%23")
    for path in ["/tenants", "/tenants?q=window", f"/tenants?plan={plan}", "/tenants/hostile"]:
        response = await site.page(path)
        assert response.status_code == 200, response.text
        text = response.text
        assert "/tenants/hostile" in text, path
        # Printed escaped, never as markup: no tag, no handler, no template expression run.
        assert "<script>window" not in text and "<img" not in text and 'onerror="window' not in text
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text
        assert "{{ 7 * 7 }}" in text


# -- the actions --------------------------------------------------------------------------


async def test_a_suspension_is_audited_under_the_operator_and_refused_by_the_app(site: Site) -> None:
    await site.manager.register_tenant("initech", "Initech", app_metadata=Base.metadata)
    as_initech = {"X-Tenant-ID": "initech"}
    assert (await site.client.get("/orders", headers=as_initech)).status_code == 200
    suspended = await site.post("/tenants/initech/suspend", operator="bob")
    assert suspended.status_code == 303, suspended.text
    assert suspended.headers["location"] == "/_tenancy/tenants/initech?done=suspended"
    refused = await site.client.get("/orders", headers=as_initech)
    assert refused.status_code == 403 and refused.json() == {
        "detail": "Tenant is not active (status: suspended)"
    }
    page = await site.page("/tenants/initech?done=suspended")
    assert "Suspended: the application refuses" in page.text
    assert "console:bob" in page.text  # the history, from the audit log
    activated = await site.post("/tenants/initech/activate")
    assert activated.status_code == 303
    assert (await site.client.get("/orders", headers=as_initech)).status_code == 200
    assert (await _history(site, "initech"))[:2] == [
        ("activated", "console:alice"),
        ("suspended", "console:bob"),
    ]


async def test_a_change_the_lifecycle_forbids_is_refused_with_the_reason(site: Site) -> None:
    response = await site.post("/tenants/acme/activate")
    assert response.status_code == 409
    assert "cannot go from active to active" in response.text
    assert (await site.manager.get_tenant("acme")).status is TenantStatus.ACTIVE


async def test_delete_needs_the_identifier_typed_and_destroys_data_only_when_asked(site: Site) -> None:
    for typed in ["", "acm", "ACME", "acme-corp"]:
        response = await site.post("/tenants/acme/delete", {"confirm": typed, "destroy": "yes"})
        assert response.status_code == 409, typed
        assert "type the identifier acme exactly" in response.text
    assert (await site.manager.get_tenant("acme")).status is TenantStatus.ACTIVE
    soft = await site.post("/tenants/acme/delete", {"confirm": "acme"})
    assert soft.status_code == 303 and soft.headers["location"].endswith("/tenants/acme?done=deleted")
    assert (await site.manager.get_tenant("acme")).status is TenantStatus.DELETED
    deleted = await site.page("/tenants/acme?done=deleted")
    assert "Destroy its data" in deleted.text and "Suspend" not in deleted.text
    assert (await site.post("/tenants/acme/delete", {"confirm": "acme", "destroy": "yes"})).status_code == 303
    with pytest.raises(TenantNotFoundError):  # purged: the identifier is free again
        await site.manager.get_tenant("acme")
    purged = await site.post("/tenants/globex/delete", {"confirm": "globex", "destroy": "yes"})
    assert purged.status_code == 303 and purged.headers["location"] == "/_tenancy/tenants?done=purged"
    with pytest.raises(TenantNotFoundError):
        await site.manager.get_tenant("globex")
    assert (await site.page("/tenants/globex")).status_code == 404


async def test_moving_needs_hybrid_isolation_and_the_app_metadata(site: Site) -> None:
    response = await site.post("/tenants/acme/move", {"tier": "schema"})
    assert response.status_code == 400
    assert "Move to tier" not in (await site.page("/tenants/acme")).text


FORGERIES: list[tuple[dict[str, str], str | None, str]] = [
    ({}, "", "carries no token"),
    ({}, "0" * 64, "not valid"),
    ({"Origin": "https://evil.example"}, None, "another origin"),
    ({"Origin": "null"}, None, "another origin"),
    ({"Sec-Fetch-Site": "cross-site"}, None, "another site (cross-site)"),
    ({"Sec-Fetch-Site": "same-site"}, None, "another site (same-site)"),
]


async def test_forged_forms_are_refused(site: Site) -> None:
    for headers, token, reason in FORGERIES:
        response = await site.post("/tenants/acme/suspend", token=token, headers=headers)
        assert response.status_code == 403, (headers, token)
        assert reason in response.text
    assert (await site.manager.get_tenant("acme")).status is TenantStatus.ACTIVE


async def test_a_token_is_the_operator_s_own_and_a_same_origin_form_passes(site: Site) -> None:
    bobs = await site.token("bob")
    assert (await site.post("/tenants/acme/suspend", token=bobs, operator="alice")).status_code == 403
    same_origin = {"Origin": "http://app.test", "Sec-Fetch-Site": "same-origin"}
    response = await site.post("/tenants/acme/suspend", headers=same_origin)
    assert response.status_code == 303


async def test_a_secret_makes_a_planted_cookie_worthless(site: Site) -> None:
    app, console = mount(site.manager, csrf_secret="s3cret")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app.test"
    ) as client:
        planted = "p" * 43
        client.cookies.set(COOKIE, planted, domain="app.test", path="/_tenancy/")
        forged = CSRFGuard().token(planted, "alice")  # what anyone can compute without the secret
        headers = {"X-Operator": "alice"}
        refused = await client.post("/_tenancy/tenants/acme/suspend", data={"csrf": forged}, headers=headers)
        assert refused.status_code == 403
        page = await client.get("/_tenancy/tenants/acme", headers=headers)
        token = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
        assert token is not None and token.group(1) == CSRFGuard("s3cret").token(planted, "alice")
        accepted = await client.post(
            "/_tenancy/tenants/acme/suspend", data={"csrf": token.group(1)}, headers=headers
        )
        assert accepted.status_code == 303
    await console.close()


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"json": {"csrf": "x"}}, 415),
        (
            {
                "content": b"csrf=" + b"a" * 20_000,
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
            413,
        ),
    ],
    ids=["json", "too-large"],
)
async def test_only_small_forms_are_read(site: Site, request_kwargs: dict[str, Any], status: int) -> None:
    headers = {"X-Operator": "alice", **request_kwargs.pop("headers", {})}
    response = await site.client.post("/_tenancy/tenants/acme/suspend", headers=headers, **request_kwargs)
    assert response.status_code == status


async def test_unknown_input_is_a_clear_4xx(site: Site) -> None:
    for path, status in [
        ("/tenants/nobody", 404),
        ("/tenants/NOT-A-SLUG", 404),
        ("/tenants?status=bogus", 400),
        ("/fleet/runs/not-hex!", 404),
        ("/fleet/runs/0123abcd", 404),
        ("/tenants?after=" + "z" * 300, 400),
    ]:
        response = await site.page(path)
        assert response.status_code == status, (path, response.text)
        assert 'role="alert"' in response.text


async def test_the_console_never_opens_a_tenant_session(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    async def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("the console opened a tenant session")

    monkeypatch.setattr(site.manager.isolation, "session", tripwire)
    for path in PAGES[:-3] + ["/tenants/hostile", "/traffic", "/doctor"]:
        assert (await site.page(path)).status_code in (200, 303), path
    assert (await site.post("/tenants/acme/suspend")).status_code == 303
    assert (await site.post("/tenants/acme/activate")).status_code == 303
    assert (await site.post("/tenants/globex/delete", {"confirm": "globex"})).status_code == 303


async def test_the_doctor_page_shows_every_check(site: Site) -> None:
    page = await site.page("/doctor")
    for check in ("configuration", "connectivity", "registry", "invalidation channel"):
        assert f"<td>{check}</td>" in page.text
    assert "3 tenants" in page.text


def test_the_console_needs_no_metrics_extra(tmp_path: Path) -> None:
    # prometheus-client is an extra of its own: without it, the traffic page says what to add.
    code = f"""
import asyncio, sys
sys.modules["prometheus_client"] = None
import httpx
from fastapi import FastAPI
from fastapi_tenancy import TenancyConfig, TenancyManager

async def main():
    manager = TenancyManager(TenancyConfig(database_url="sqlite:///{tmp_path / "app.db"}"))
    await manager.initialize()
    await manager.register_tenant("acme", "Acme")
    app = FastAPI()
    app.mount("/_tenancy", manager.console(auth=lambda: "alice"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for path in ("/tenants", "/tenants/acme", "/traffic", "/fleet", "/doctor"):
            response = await client.get("/_tenancy" + path)
            print(path, response.status_code, "No metrics" in response.text)
    await manager.close()

asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:5] == [
        "/tenants 200 False",
        "/tenants/acme 200 False",
        "/traffic 200 True",
        "/fleet 200 False",
        "/doctor 200 False",
    ], result.stdout + result.stderr
