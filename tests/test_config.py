"""TenancyConfig: environment variables, validation naming the field, masked secrets."""

import pytest
from pydantic import SecretStr, ValidationError

from fastapi_tenancy import TenancyConfig


def test_environment_alone_configures_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANCY_DATABASE_URL", "postgresql+asyncpg://user:pass@localhost/myapp")
    monkeypatch.setenv("TENANCY_RESOLUTION_STRATEGY", "header")
    monkeypatch.setenv("TENANCY_ISOLATION_STRATEGY", "schema")
    monkeypatch.setenv("TENANCY_CACHE_TTL", "12.5")
    config = TenancyConfig()
    assert config.database_url == "postgresql+asyncpg://user:pass@localhost/myapp"
    assert (config.resolution_strategy, config.isolation_strategy, config.cache_ttl) == (
        "header",
        "schema",
        12.5,
    )


# One environment value per field, and what it must parse to. A new field without a
# line here fails the test: every field must be settable from the environment.
ENV_SAMPLES: dict[str, tuple[str, object]] = {
    "database_url": ("sqlite:///env.db", "sqlite+aiosqlite:///env.db"),
    "resolution_strategy": ("custom", "custom"),
    "isolation_strategy": ("schema", "schema"),
    "tenant_header_name": ("X-Org", "X-Org"),
    "schema_prefix": ("org_", "org_"),
    "database_pool_size": ("3", 3),
    "database_max_overflow": ("4", 4),
    "database_pool_timeout": ("2.5", 2.5),
    "database_pool_recycle": ("-1", -1),
    "database_pool_pre_ping": ("true", True),
    "database_echo": ("true", True),
    "database_pgbouncer": ("false", False),
    "cache_ttl": ("1.5", 1.5),
    "cache_max_size": ("50", 50),
    "negative_cache_ttl": ("0", 0.0),
    "negative_cache_max_size": ("60", 60),
    "gc_freeze": ("false", False),
    "max_cached_engines": ("7", 7),
    # resolution strategies (set together here, so only the field types are checked:
    # the strategy is "custom", and the combinations are tested in tests/resolution/)
    "domain_suffix": ("Example.COM.", "example.com"),
    "central_domains": ('["Example.COM.", "admin.example.com"]', ("example.com", "admin.example.com")),
    "reserved_subdomains": ('["www", "API"]', ("www", "api")),
    "trusted_proxies": ('["10.0.0.0/8", "::1"]', ("10.0.0.0/8", "::1")),
    "path_prefix": ("/tenants", "/tenants"),
    "jwt_algorithms": ('["RS256", "ES256"]', ("RS256", "ES256")),
    "jwt_secret": ("s" * 32, SecretStr("s" * 32)),
    "jwt_public_key": ("-----BEGIN PUBLIC KEY-----", "-----BEGIN PUBLIC KEY-----"),
    "jwt_jwks_url": ("https://idp.example.com/jwks", "https://idp.example.com/jwks"),
    "jwt_jwks_cache_ttl": ("60", 60.0),
    "jwt_audience": ("api", "api"),
    "jwt_issuer": ("https://idp.example.com/", "https://idp.example.com/"),
    "jwt_leeway": ("5", 5.0),
    "jwt_tenant_claim": ("org.slug", "org.slug"),
    "jwt_require_exp": ("false", False),
    "resolution_chain": ('["jwt", "subdomain"]', ("jwt", "subdomain")),
    "resolution_chain_mode": ("agree", "agree"),
    "anti_enumeration": ("false", False),  # true needs both caches on: tests/resolution/test_config.py
    # Redis, invalidation and rate limiting
    "redis_url": ("redis://:pw@cache:6379/2", "redis://:pw@cache:6379/2"),
    "redis_key_prefix": ("app1:", "app1:"),
    "redis_timeout": ("0.25", 0.25),
    "rate_limit_enabled": ("true", True),
    "rate_limit_requests": ("30", 30),
    "rate_limit_window": ("1.5", 1.5),
    "rate_limit_plans": ('{"free": 60, "pro": 600}', {"free": 60, "pro": 600}),
    "rate_limit_fail_open": ("false", False),
    "tenant_max_concurrent_requests": ("4", 4),
    "tenant_concurrency_wait": ("0.5", 0.5),
    # database per tenant
    "database_connection_budget": ("30", 30),
    "database_tenant_pool_size": ("3", 3),
    "encryption_keys": ('["key-one", "key-two"]', [SecretStr("key-one"), SecretStr("key-two")]),
    "schema_template": ("tenancy_template", "tenancy_template"),
    "alembic_config": ("deploy/alembic.ini", "deploy/alembic.ini"),
    "maintenance_message": ("Back soon", "Back soon"),
    "maintenance_retry_after": ("300", 300),
    # row-level security and hybrid tiers
    "database_owner_url": ("postgresql://owner@db/app", "postgresql+asyncpg://owner@db/app"),
    "rls_tenant_column": ("org_id", "org_id"),
    "rls_setting_namespace": ("myapp", "myapp"),
    "hybrid_default_tier": ("schema", "schema"),
    "hybrid_plan_tiers": ('{"enterprise": "schema", "free": "rls"}', {"enterprise": "schema", "free": "rls"}),
    "schema_spares": ("5", 5),
    "schema_shared_statements": ("false", False),
    "schema_tenant_roles": ("false", False),  # true needs PostgreSQL: see the cases below
    "database_cluster": ("none", "none"),
}


def test_every_field_has_an_env_variable_and_a_docstring(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(ENV_SAMPLES) == set(TenancyConfig.model_fields)
    for name, (raw, _) in ENV_SAMPLES.items():
        assert (TenancyConfig.model_fields[name].description or "").strip(), f"{name} has no docstring"
        monkeypatch.setenv(f"TENANCY_{name.upper()}", raw)
    config = TenancyConfig()
    assert {name: getattr(config, name) for name in ENV_SAMPLES} == {
        n: v for n, (_, v) in ENV_SAMPLES.items()
    }


def test_keyword_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANCY_TENANT_HEADER_NAME", "X-From-Env")
    assert TenancyConfig(tenant_header_name="X-From-Code").tenant_header_name == "X-From-Code"


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("sqlite+aiosqlite://", "sqlite+aiosqlite://"),
    ],
)
def test_database_urls_get_the_async_driver(url: str, normalised: str) -> None:
    assert TenancyConfig(database_url=url).database_url == normalised


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"database_url": "not a url"}, "database_url"),
        ({"database_url": "oracle://u@h/db"}, "database_url"),
        ({"database_url": "mysql://root@h/db"}, "isolation_strategy"),
        ({"isolation_strategy": "rls"}, "isolation_strategy"),
        ({"resolution_strategy": "telepathy"}, "resolution_strategy"),
        ({"tenant_header_name": "X Tenant"}, "tenant_header_name"),
        ({"schema_prefix": "pg_"}, "schema_prefix"),
        ({"schema_prefix": "Tenant_"}, "schema_prefix"),
        ({"schema_prefix": ""}, "schema_prefix"),
        ({"database_pool_size": 0}, "database_pool_size"),
        ({"cache_ttl": -1}, "cache_ttl"),
        ({"database_pgbouncer": True}, "database_pgbouncer"),
        ({"cache_max_size": 0}, "cache_max_size"),
        ({"databse_url": "sqlite://"}, "databse_url"),
        ({"database_connection_budget": 0}, "database_connection_budget"),
        ({"database_connection_budget": 4, "database_tenant_pool_size": 5}, "database_tenant_pool_size"),
        ({"isolation_strategy": "hybrid", "database_url": "mysql://root@h/db"}, "isolation_strategy"),
        ({"isolation_strategy": "rls", "database_url": "postgresql://app@h/db"}, "database_owner_url"),
        (
            {
                "isolation_strategy": "rls",
                "database_url": "postgresql://a@h/db",
                "database_owner_url": "mysql://o@h/db",
            },
            "database_owner_url",
        ),
        ({"rls_tenant_column": "Tenant-Id"}, "rls_tenant_column"),
        ({"rls_setting_namespace": "a.b"}, "rls_setting_namespace"),
        ({"hybrid_plan_tiers": {"pro": "dedicated"}}, "hybrid_plan_tiers"),
        ({"schema_spares": 3}, "schema_spares"),
        ({"schema_spares": -1}, "schema_spares"),
        ({"schema_tenant_roles": True}, "schema_tenant_roles"),  # SQLite
        (
            {
                "schema_tenant_roles": True,
                "isolation_strategy": "rls",
                "database_url": "postgresql://a@h/db",
                "database_owner_url": "postgresql://o@h/db",
            },
            "schema_tenant_roles",
        ),
        ({"schema_tenant_roles": True, "database_url": "postgresql://a@h/db"}, "database_owner_url"),
        ({"database_cluster": "citus"}, "database_cluster"),  # the default SQLite URL
        ({"database_cluster": "mesh"}, "database_cluster"),
        (
            {
                "database_cluster": "citus",
                "database_url": "postgresql://a@h/db",
                "isolation_strategy": "database",
            },
            "database_cluster",
        ),
    ],
)
def test_invalid_settings_fail_at_construction_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        TenancyConfig(**kwargs)  # type: ignore[arg-type]
    assert field in str(raised.value)


def test_password_is_masked_in_repr_and_str() -> None:
    config = TenancyConfig(database_url="postgresql+asyncpg://app:s3cr3t-pw@db/app")
    for text in (repr(config), str(config)):
        assert "s3cr3t-pw" not in text
        assert "***" in text
    assert config.database_url.endswith("app:s3cr3t-pw@db/app")  # the real value stays usable


def test_owner_password_is_masked_too() -> None:
    config = TenancyConfig(
        database_url="postgresql://app@db/app",
        database_owner_url="postgresql://owner:0wn3r-pw@db/app",
        isolation_strategy="rls",
    )
    for text in (repr(config), str(config)):
        assert "0wn3r-pw" not in text
    assert config.database_owner_url == "postgresql+asyncpg://owner:0wn3r-pw@db/app"


def test_tenant_roles_with_an_owner_are_accepted() -> None:
    config = TenancyConfig(
        database_url="postgresql://app@db/app",
        database_owner_url="postgresql://owner@db/app",
        schema_tenant_roles=True,
    )
    assert config.schema_tenant_roles


def test_config_is_immutable() -> None:
    config = TenancyConfig()
    with pytest.raises(ValidationError):
        config.cache_ttl = 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("redis_url", "http://cache:6379"),
        ("redis_timeout", 0),
        ("rate_limit_requests", 0),
        ("rate_limit_window", 0),
        ("rate_limit_plans", {"free": 0}),
    ],
)
def test_invalid_redis_and_rate_limit_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        TenancyConfig(**{field: value})  # type: ignore[arg-type]


def test_redis_password_is_masked() -> None:
    config = TenancyConfig(redis_url="redis://:s3cret@cache:6379/0")
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)
    assert config.redis_url == "redis://:s3cret@cache:6379/0"


def test_database_isolation_accepts_every_backend_and_hides_the_keys() -> None:
    for url in ("postgresql://u@h/db", "mysql://root@h/db", "mariadb://root@h/db", "sqlite://"):
        assert TenancyConfig(database_url=url, isolation_strategy="database").isolation_strategy == "database"
    config = TenancyConfig(encryption_keys=["k3y-material"])  # type: ignore[list-item]
    for text in (repr(config), str(config), config.model_dump_json()):
        assert "k3y-material" not in text
