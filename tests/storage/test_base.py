"""The defaults of the TenantStore contract, for stores that do not override them."""

import pytest

from fastapi_tenancy import ConfigurationError, Tenant
from fastapi_tenancy.domain import Domain
from fastapi_tenancy.storage import InMemoryTenantStore, TenantStore


async def test_a_store_without_domains_refuses_them_clearly() -> None:
    # A custom store written before domains existed: everything else works, domains say why not.
    class Plain(InMemoryTenantStore):
        keeps_domains = False
        get_domain = TenantStore.get_domain
        get_domains = TenantStore.get_domains
        add_domain = TenantStore.add_domain
        remove_domain = TenantStore.remove_domain

    store = Plain()
    tenant = await store.create(Tenant(identifier="acme", name="Acme"))
    for call in (
        store.get_domain("acme.com"),
        store.get_by_domain("acme.com"),
        store.get_domains(tenant.id),
        store.add_domain(Domain("acme.com", tenant.id)),
        store.remove_domain("acme.com", tenant_id=tenant.id),
    ):
        with pytest.raises(ConfigurationError, match="keeps no custom domains"):
            await call
