"""Anti-enumeration: unknown, suspended and deleted tenants answer alike, after the same work."""

import httpx
import pytest

from fastapi_tenancy import TenancyConfig, Tenant
from fastapi_tenancy.storage import InMemoryTenantStore

from ..asgi import websocket
from .conftest import Build, accepted_as

NOT_FOUND = b'{"detail": "Tenant not found"}'


class CountingStore(InMemoryTenantStore):
    """The in-memory store, counting the reads on the request path."""

    reads = 0

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        self.reads += 1
        return await super().get_by_identifier(identifier)


async def _answer(client: httpx.AsyncClient, slug: str) -> tuple[int, bytes, dict[str, str]]:
    response = await client.get("/whoami", headers={"X-Tenant-ID": slug})
    headers = {k: v for k, v in response.headers.items() if k not in ("date",)}
    return response.status_code, response.content, headers


async def test_unknown_suspended_and_deleted_are_indistinguishable(build: Build) -> None:
    async with build(anti_enumeration=True) as (client, app, _):
        answers = {
            slug: await _answer(client, slug) for slug in ("unknown-co", "sleepy", "gone", "Not-A-Slug")
        }
        assert len(set(map(repr, answers.values()))) == 1, answers
        assert answers["sleepy"][:2] == (404, NOT_FOUND)
        assert (await client.get("/whoami", headers={"X-Tenant-ID": "acme"})).status_code == 200
        for slug in ("unknown-co", "sleepy", "gone"):
            refused = await websocket(app, [("x-tenant-id", slug)])
            assert refused == [{"type": "websocket.close", "code": 1008, "reason": "Tenant not found"}]
        assert accepted_as(await websocket(app, [("x-tenant-id", "acme")])) == "acme"


async def test_off_by_default_the_spec_table_holds(build: Build) -> None:
    async with build() as (client, _, _):
        assert (await _answer(client, "sleepy"))[:2] == (
            403,
            b'{"detail": "Tenant is not active (status: suspended)"}',
        )


@pytest.mark.parametrize("cache_ttl", [30.0, 0.0])
async def test_every_case_costs_the_same_registry_work(build: Build, cache_ttl: float) -> None:
    # Same time class: each identifier, known or not, costs one registry read and is
    # then served from memory (or, with the caches off, one read every time).
    store = CountingStore()
    config = TenancyConfig(
        database_url="sqlite://", anti_enumeration=True, cache_ttl=cache_ttl, negative_cache_ttl=cache_ttl
    )
    async with build(config, store=store) as (client, _, manager):
        manager.lookup.clear()
        reads = {}
        for slug in ("unknown-co", "sleepy", "gone", "acme"):
            before = store.reads
            for _ in range(3):
                await _answer(client, slug)
            reads[slug] = store.reads - before
    expected = 1 if cache_ttl else 3
    assert reads == dict.fromkeys(("unknown-co", "sleepy", "gone", "acme"), expected)
