"""fastapi-tenancy 0.5.0's import paths: its middleware path and top-level names import, or
fail at import with an error naming what replaced them."""

import importlib
import subprocess
import sys

import pytest

import fastapi_tenancy
from fastapi_tenancy.compat import LEGACY_NAMES

# 0.5.0's fastapi_tenancy.__all__.
ALL_050 = [
    "__version__", "TenancyConfig", "TenancyManager", "AuditLog", "IsolationStrategy",
    "ResolutionStrategy", "Tenant", "TenantConfig", "TenantMetrics", "TenantStatus", "TenantContext",
    "get_current_tenant", "tenant_scope", "TenancyError", "TenantNotFoundError", "TenantResolutionError",
    "TenantInactiveError", "IsolationError", "ConfigurationError", "MigrationError",
    "RateLimitExceededError", "TenantDataLeakageError", "TenantQuotaExceededError",
    "DatabaseConnectionError", "SQLAlchemyTenantStore", "InMemoryTenantStore", "TenantStore",
    "BaseIsolationProvider", "DatabaseIsolationProvider", "HybridIsolationProvider",
    "RLSIsolationProvider", "SchemaIsolationProvider", "TenancyMiddleware", "BaseTenantResolver",
    "HeaderTenantResolver", "PathTenantResolver", "SubdomainTenantResolver", "TenantCache",
    "RedisTenantStore", "JWTTenantResolver", "TenantMigrationManager",
]  # fmt: skip


def test_every_050_top_level_name_is_exported_or_explained() -> None:
    exported = set(fastapi_tenancy.__all__)
    explained = set(LEGACY_NAMES)
    assert not exported & explained
    assert set(ALL_050) == (set(ALL_050) & exported) | explained


@pytest.mark.parametrize("name", sorted(LEGACY_NAMES))
def test_a_050_name_we_do_not_export_says_what_replaced_it(name: str) -> None:
    with pytest.raises(ImportError) as caught:
        exec(f"from fastapi_tenancy import {name}", {})
    message = str(caught.value)
    assert message.startswith(f"{name} was a fastapi-tenancy 0.5.0 name; {LEGACY_NAMES[name]}")
    assert "docs/coming-from-0.5.md" in message


def test_other_unknown_names_are_plain_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'TenancyManger'"):
        fastapi_tenancy.TenancyManger  # noqa: B018 - the access is the test
    assert not hasattr(fastapi_tenancy, "nothing_like_this")


def test_the_050_stores_are_exported_at_the_root() -> None:
    from fastapi_tenancy.storage import InMemoryTenantStore, TenantStore
    from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

    assert fastapi_tenancy.SQLAlchemyTenantStore is SQLAlchemyTenantStore
    assert fastapi_tenancy.InMemoryTenantStore is InMemoryTenantStore
    assert fastapi_tenancy.TenantStore is TenantStore


def test_the_050_middleware_path_is_the_middleware_module() -> None:
    module = importlib.import_module("fastapi_tenancy.middleware.tenancy")
    assert module.TenancyMiddleware is fastapi_tenancy.TenancyMiddleware


def test_the_050_middleware_path_imports_first_in_a_fresh_interpreter() -> None:
    code = (
        "from fastapi_tenancy.middleware.tenancy import TenancyMiddleware; print(TenancyMiddleware.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "TenancyMiddleware"
