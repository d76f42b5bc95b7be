"""The resolution settings: invalid combinations fail at construction naming the field."""

import subprocess
import sys
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.resolution import ChainResolver, DomainResolver, PathResolver, SubdomainResolver
from fastapi_tenancy.storage import InMemoryTenantStore

SECRET = "x" * 32
PUBLIC_KEY = (  # an Ed25519 public key
    "-----BEGIN PUBLIC KEY-----\n"
    "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
    "-----END PUBLIC KEY-----\n"
)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"resolution_strategy": "subdomain"}, "domain_suffix"),
        ({"domain_suffix": "not a domain"}, "domain_suffix"),
        ({"domain_suffix": "example.123"}, "domain_suffix"),
        ({"domain_suffix": "-bad.example.com"}, "domain_suffix"),
        ({"domain_suffix": "\u212aexample.com"}, "domain_suffix"),  # the Kelvin sign, lowered to "k"
        ({"central_domains": ["localhost"]}, "central_domains"),
        ({"central_domains": ["10.0.0.1"]}, "central_domains"),
        ({"central_domains": ["xn--bcher-kva.example"]}, "central_domains"),
        ({"central_domains": ["b\u00fccher.example"]}, "central_domains"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies"),
        ({"trusted_proxies": ["proxy.internal"]}, "trusted_proxies"),
        ({"path_prefix": "t"}, "path_prefix"),
        ({"path_prefix": "/t/"}, "path_prefix"),
        ({"path_prefix": "/t/../admin"}, "path_prefix"),
        ({"resolution_strategy": "jwt"}, "jwt_algorithms"),
        ({"resolution_strategy": "jwt", "jwt_algorithms": ["none"], "jwt_secret": SECRET}, "jwt_algorithms"),
        (
            {"resolution_strategy": "jwt", "jwt_algorithms": ["HS256", "RS256"], "jwt_secret": SECRET},
            "jwt_algorithms",
        ),
        (
            {"resolution_strategy": "jwt", "jwt_algorithms": ["HS256"], "jwt_public_key": PUBLIC_KEY},
            "jwt_public_key",
        ),
        (
            {"resolution_strategy": "jwt", "jwt_algorithms": ["HS256"], "jwt_jwks_url": "https://i/j"},
            "jwt_jwks_url",
        ),
        ({"resolution_strategy": "jwt", "jwt_algorithms": ["HS256"]}, "jwt_secret"),
        ({"resolution_strategy": "jwt", "jwt_algorithms": ["HS256"], "jwt_secret": "short"}, "jwt_secret"),
        ({"resolution_strategy": "jwt", "jwt_algorithms": ["EdDSA"], "jwt_secret": SECRET}, "jwt_secret"),
        ({"resolution_strategy": "jwt", "jwt_algorithms": ["EdDSA"]}, "jwt_public_key"),
        (
            {"resolution_strategy": "jwt", "jwt_algorithms": ["EdDSA"], "jwt_jwks_url": "ftp://x"},
            "jwt_jwks_url",
        ),
        ({"jwt_leeway": 3600}, "jwt_leeway"),
        ({"jwt_tenant_claim": "org..slug"}, "jwt_tenant_claim"),
        ({"resolution_strategy": "chain"}, "resolution_chain"),
        ({"resolution_strategy": "chain", "resolution_chain": ["custom"]}, "resolution_chain"),
        ({"resolution_strategy": "chain", "resolution_chain": ["header", "subdomain"]}, "domain_suffix"),
        ({"anti_enumeration": True, "negative_cache_ttl": 0}, "anti_enumeration"),
    ],
)
def test_invalid_settings_fail_naming_the_field(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        TenancyConfig(database_url="sqlite://", **settings)


def test_the_jwt_secret_is_masked() -> None:
    config = TenancyConfig(
        resolution_strategy="jwt", jwt_algorithms=("HS256",), jwt_secret=SecretStr("top-secret-" * 4)
    )
    assert "top-secret" not in repr(config) and "top-secret" not in str(config)


def test_anti_enumeration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANCY_ANTI_ENUMERATION", "true")
    assert TenancyConfig().anti_enumeration is True


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        ({"resolution_strategy": "subdomain", "domain_suffix": "example.com"}, SubdomainResolver),
        ({"resolution_strategy": "path", "path_prefix": "/orgs"}, PathResolver),
        ({"resolution_strategy": "domain"}, DomainResolver),
        ({"resolution_strategy": "domain", "domain_suffix": "example.com"}, DomainResolver),
        (
            {
                "resolution_strategy": "chain",
                "resolution_chain": ["jwt", "subdomain"],
                "domain_suffix": "example.com",
                "jwt_algorithms": ["EdDSA"],
                "jwt_public_key": PUBLIC_KEY,
            },
            ChainResolver,
        ),
    ],
)
def test_the_manager_builds_the_configured_resolver(settings: dict[str, Any], kind: type) -> None:
    manager = TenancyManager(TenancyConfig(database_url="sqlite://", **settings), InMemoryTenantStore())
    assert isinstance(manager.resolver, kind)


def test_importing_the_package_does_not_import_pyjwt() -> None:
    code = (
        "import sys, fastapi_tenancy, fastapi_tenancy.resolution, fastapi_tenancy.manager;"
        "bad = [m for m in ('jwt', 'httpx', 'cryptography') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
