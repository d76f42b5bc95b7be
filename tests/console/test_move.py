"""Moving a tenant between hybrid tiers from the console, on real PostgreSQL with its two roles."""

import pytest
from fastapi import FastAPI

from fastapi_tenancy import TenancyManager
from fastapi_tenancy.audit import SQLAuditWriter
from fastapi_tenancy.console import Console

from ..apps import SharedBase, SharedOrder, build_app
from ..isolation.conftest import Roles, roles  # noqa: F401 - a fixture: the owner and application roles
from ..isolation.test_matrix import shared_settings, two_tenants
from .conftest import Site, operator_login

pytestmark = pytest.mark.postgres


async def test_an_operator_moves_a_tenant_to_another_tier(roles: Roles) -> None:  # noqa: F811
    consoles: list[Console] = []

    def build(manager: TenancyManager) -> FastAPI:
        app = build_app(manager, SharedOrder, excluded_paths=("/health", "/_tenancy"))
        consoles.append(manager.console(auth=operator_login, app_metadata=SharedBase.metadata))
        app.mount("/_tenancy", consoles[0])
        return app

    async with two_tenants(roles.app_url, build=build, **shared_settings(roles, "hybrid")) as env:
        site = Site(env.manager, consoles[0], FastAPI(), env.client, token_page="/tenants/alpha")
        page = await site.page("/tenants/beta")
        assert "Move to tier" in page.text
        # Every tier but the tenant's own (rls) is offered.
        assert '<option value="schema">' in page.text and '<option value="rls">' not in page.text
        listed = await site.page("/tenants?tier=rls")
        assert '<th scope="col">Tier</th>' in listed.text and "/_tenancy/tenants/beta" in listed.text
        assert "/_tenancy/tenants/alpha" not in listed.text

        moved = await site.post("/tenants/beta/move", {"tier": "schema"})
        assert moved.status_code == 303 and moved.headers["location"].endswith("/tenants/beta?done=moved")
        assert (await env.manager.get_tenant("beta")).tier == "schema"
        # The tenant is served from its new tier, with its rows.
        orders = (await env.get("beta", "/orders")).json()["orders"]
        assert [o["description"] for o in orders] == ["beta-1", "beta-3"]
        audit = env.manager.events.audit
        assert isinstance(audit, SQLAuditWriter)
        beta = await env.manager.get_tenant("beta")
        assert (await audit.entries(tenant_id=beta.id, limit=1))[0].actor == "console:alice"

        # A move the strategy refuses says why, and changes nothing.
        refused = await site.post("/tenants/beta/move", {"tier": "database"})
        assert refused.status_code == 409 and 'role="alert"' in refused.text
        assert (await env.manager.get_tenant("beta")).tier == "schema"
        bogus = await site.post("/tenants/beta/move", {"tier": "gold"})
        assert bogus.status_code == 400

        # Back to the shared tables: refused while the old copy is there, until it is removed.
        back = await site.post("/tenants/beta/move", {"tier": "rls"})
        assert back.status_code == 409 and "remove the old copy first" in back.text
        unconfirmed = await site.post("/tenants/beta/remove-old-copy")
        assert unconfirmed.status_code == 409 and "tick the box" in unconfirmed.text
        removed = await site.post("/tenants/beta/remove-old-copy", {"confirm": "yes"})
        assert removed.status_code == 303 and removed.headers["location"].endswith("?done=old-copy-removed")
        back = await site.post("/tenants/beta/move", {"tier": "rls"})
        assert back.status_code == 303
        assert (await env.manager.get_tenant("beta")).tier == "rls"
        orders = (await env.get("beta", "/orders")).json()["orders"]
        assert [o["description"] for o in orders] == ["beta-1", "beta-3"]
        await consoles[0].close()
