"""The console over a manager, behind a test login (the `X-Operator` header names the operator)."""

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.console import Console

from ..apps import build_app

OPERATORS = {"alice", "bob"}

# What a hostile tenant name, metadata value or error text may hold: markup that runs
# script if printed as is, a template expression, and quotes that end an attribute.
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">\' {{ 7 * 7 }} &amp;'


def operator_login(x_operator: Annotated[str | None, Header()] = None) -> str:
    """The test's auth dependency: the operators above, everyone else refused."""
    if x_operator not in OPERATORS:
        raise HTTPException(401, "Not authenticated", headers={"WWW-Authenticate": "Operator"})
    return x_operator


@dataclass
class Site:
    manager: TenancyManager
    console: Console
    app: FastAPI
    client: httpx.AsyncClient
    token_page: str = "/tenants/hostile"
    """A page with a form, to read the token from (no test deletes this tenant)."""

    async def page(self, path: str, operator: str = "alice") -> httpx.Response:
        return await self.client.get(f"/_tenancy{path}", headers={"X-Operator": operator})

    async def post(
        self,
        path: str,
        data: dict[str, str] | None = None,
        *,
        operator: str = "alice",
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST a form after opening a console page (its token, unless `token` is given)."""
        own = await self.token(operator)  # and the cookie, on the first visit
        token = own if token is None else token
        return await self.client.post(
            f"/_tenancy{path}",
            data={"csrf": token, **(data or {})},
            headers={"X-Operator": operator, **(headers or {})},
        )

    async def token(self, operator: str = "alice") -> str:
        """The form token a console page gives `operator` (and, the first time, the cookie)."""
        response = await self.page(self.token_page, operator)
        match = re.search(r'name="csrf" value="([0-9a-f]{64})"', response.text)
        assert match is not None, response.text
        return match.group(1)


def mount(manager: TenancyManager, **options: Any) -> tuple[FastAPI, Console]:
    """The test app with the console mounted at /_tenancy, as the docs show it."""
    app = build_app(manager, excluded_paths=("/health", "/_tenancy"))
    console = manager.console(auth=operator_login, **options)
    app.mount("/_tenancy", console)
    return app, console


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    """A manager on SQLite with three tenants (one with a hostile name), and the console over it."""
    manager = TenancyManager(
        TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}", rate_limit_enabled=True)
    )
    await manager.initialize()
    try:
        await manager.register_tenant("acme", "Acme Corporation", metadata={"plan": "pro"})
        await manager.register_tenant("globex", "Globex", metadata={"plan": "free"})
        await manager.register_tenant("hostile", HOSTILE, metadata={"plan": HOSTILE, "note": HOSTILE})
        app, console = mount(manager)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as client:
            yield Site(manager, console, app, client)
        await console.close()
    finally:
        await manager.close()
