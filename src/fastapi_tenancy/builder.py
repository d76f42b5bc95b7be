"""`build_parts`: the one place that maps a `TenancyConfig` to concrete parts.

The manager, doctor and fleet talk to the families through their base classes
(`Resolver`, `Isolation`, `TenantStore`, ...); only this module imports the concrete
strategies, and it runs once, when a `TenancyManager` is made.
"""

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ._utils import create_engine, redis_client
from .audit import AuditWriter, SQLAuditWriter
from .config import TenancyConfig
from .domain import DomainPolicy
from .errors import ConfigurationError
from .events import LifecycleEvents
from .invalidation.base import InvalidationChannel
from .isolation.base import Isolation
from .isolation.citus import CitusCluster
from .isolation.database import DatabaseIsolation
from .isolation.hybrid import HybridIsolation
from .isolation.rls import RLSIsolation
from .isolation.schema import SchemaIsolation
from .isolation.sqlite import SQLiteFileIsolation
from .lookup import TenantLookup
from .ratelimit.base import RateLimiter
from .ratelimit.memory import MemoryRateLimiter
from .resolution.base import Resolver, ResolverFunc, as_resolver
from .resolution.chain import ChainResolver
from .resolution.domain import DomainResolver
from .resolution.header import HeaderResolver
from .resolution.path import PathResolver
from .resolution.subdomain import SubdomainResolver
from .storage.base import TenantStore
from .storage.database import SQLAlchemyTenantStore

if TYPE_CHECKING:  # optional extras: `cryptography`; Alembic (the migrations extra)
    from .encryption import URLCipher
    from .migrations.stamp import Stamper

__all__ = ["Parts", "build_parts"]

logger = logging.getLogger("fastapi_tenancy")


@dataclass
class Parts:
    """What a `TenancyManager` is made of; built once from its config."""

    engine: AsyncEngine
    owner_engine: AsyncEngine | None
    store: TenantStore
    resolver: Resolver
    cipher: "URLCipher | None"
    isolation: Isolation
    lookup: TenantLookup
    events: LifecycleEvents
    redis: Any
    invalidation: InvalidationChannel | None
    rate_limiter: RateLimiter | None
    domains: DomainPolicy
    stamper: "Stamper | None" = None


def build_parts(
    config: TenancyConfig,
    *,
    store: TenantStore | None = None,
    resolver: Resolver | ResolverFunc | None = None,
    isolation: Isolation | None = None,
    audit: AuditWriter | None = None,
) -> Parts:
    """The engines, registry, resolver, isolation, caches and channels `config` asks for.

    Parts passed in are used as given; the others are built from `config`.
    """
    # PostgreSQL connections start with an empty search_path (fail closed), except
    # behind PgBouncer, which does not pass startup parameters on.
    empty_search_path = config.backend == "postgresql" and not config.database_pgbouncer
    engine = create_engine(
        config.database_url,
        pool_size=config.database_pool_size,
        max_overflow=config.database_max_overflow,
        pool_timeout=config.database_pool_timeout,
        pool_recycle=config.database_pool_recycle,
        pool_pre_ping=config.database_pool_pre_ping,
        echo=config.database_echo,
        pgbouncer=config.database_pgbouncer,
        empty_search_path=empty_search_path,
    )
    # The role that owns the shared tables (rls, hybrid): DDL and the registry run as
    # it, requests as the role of database_url, which therefore cannot read the
    # registry (every tenant's name and metadata) even with raw SQL.
    owner_engine: AsyncEngine | None = None
    if config.database_owner_url is not None:
        owner_engine = create_engine(
            config.database_owner_url,
            pool_size=2,
            max_overflow=2,
            pool_timeout=config.database_pool_timeout,
            pool_recycle=config.database_pool_recycle,
            pool_pre_ping=config.database_pool_pre_ping,
            echo=config.database_echo,
            pgbouncer=config.database_pgbouncer,
        )
    # The engine's connections resolve no unqualified name, so a registry sharing
    # it names its schema.
    default_store_schema = "public" if empty_search_path or owner_engine else None
    if store is None:
        store = SQLAlchemyTenantStore(owner_engine or engine, schema=default_store_schema)
    store.configure(pgbouncer=config.database_pgbouncer)
    cipher = _cipher(config)
    redis: Any = redis_client(config.redis_url, timeout=config.redis_timeout) if config.redis_url else None
    lookup = TenantLookup(
        store,
        ttl=config.cache_ttl,
        max_size=config.cache_max_size,
        negative_ttl=config.negative_cache_ttl,
        negative_max_size=config.negative_cache_max_size,
    )
    built = _resolver(config, resolver)
    built.bind(lookup)  # a strategy that looks the tenant up (domains) reads through the cache
    return Parts(
        engine=engine,
        owner_engine=owner_engine,
        store=store,
        resolver=built,
        cipher=cipher,
        isolation=isolation if isolation is not None else _isolation(config, engine, owner_engine, cipher),
        lookup=lookup,
        # Lifecycle hooks and the audit log (docs/background.md); the audit table
        # lives in the registry database unless another writer is passed.
        events=LifecycleEvents(
            audit
            if audit is not None
            else SQLAuditWriter(owner_engine or engine, schema=default_store_schema)
        ),
        redis=redis,
        invalidation=_invalidation(config, redis, store, engine),
        rate_limiter=_rate_limiter(config, redis),
        # Which hosts are whose: checked before a domain is given to a tenant, whatever the strategy.
        domains=DomainPolicy(
            domain_suffix=config.domain_suffix,
            central=config.central_domains,
            reserved=config.reserved_subdomains,
        ),
        stamper=_stamper(config, owner_engine or engine),
    )


def _stamper(config: TenancyConfig, engine: AsyncEngine) -> "Stamper | None":
    if config.alembic_config is None:
        return None
    if config.backend != "postgresql":
        raise ConfigurationError(f"alembic_config: tenant migrations need PostgreSQL, not {config.backend}")
    # Imported only when migrations are configured: needs Alembic (the migrations extra).
    from .migrations.stamp import Stamper

    return Stamper(config.alembic_config, engine=engine, config=config)


def _resolver(config: TenancyConfig, resolver: Resolver | ResolverFunc | None) -> Resolver:
    strategy = config.resolution_strategy
    if strategy == "custom":
        if resolver is None:
            raise ConfigurationError("resolution_strategy='custom' needs TenancyManager(resolver=...)")
        return as_resolver(resolver)
    if resolver is not None:
        raise ConfigurationError(
            f"a resolver was passed but resolution_strategy is {strategy!r}; "
            "set resolution_strategy='custom' to use it"
        )
    if strategy == "chain":
        # A member with nothing after it to ask (the last in `first` mode, any in `agree`
        # mode) is where a request without a token ends: there the JWT strategy says 401.
        chain = config.resolution_chain
        agree = config.resolution_chain_mode == "agree"
        return ChainResolver(
            [
                _resolution_strategy(config, name, last=agree or position == len(chain) - 1)
                for position, name in enumerate(chain)
            ],
            mode=config.resolution_chain_mode,
        )
    return _resolution_strategy(config, strategy, last=True)


def _resolution_strategy(config: TenancyConfig, name: str, *, last: bool) -> Resolver:
    if name == "subdomain":
        assert config.domain_suffix is not None  # TenancyConfig requires it
        return SubdomainResolver(
            config.domain_suffix,
            reserved=config.reserved_subdomains,
            trusted_proxies=config.trusted_proxies,
        )
    if name == "domain":
        return DomainResolver(
            domain_suffix=config.domain_suffix,
            central_domains=config.central_domains,
            reserved=config.reserved_subdomains,
            trusted_proxies=config.trusted_proxies,
        )
    if name == "path":
        return PathResolver(config.path_prefix)
    if name == "jwt":
        # Imported here: PyJWT is an optional extra, needed only by this strategy.
        from .resolution.jwt import JWTResolver

        return JWTResolver(
            config.jwt_algorithms,
            secret=config.jwt_secret.get_secret_value() if config.jwt_secret is not None else None,
            public_key=config.jwt_public_key,
            jwks_url=config.jwt_jwks_url,
            jwks_cache_ttl=config.jwt_jwks_cache_ttl,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            leeway=config.jwt_leeway,
            tenant_claim=config.jwt_tenant_claim,
            require_exp=config.jwt_require_exp,
            required=last,
        )
    return HeaderResolver(config.tenant_header_name)


def _cipher(config: TenancyConfig) -> "URLCipher | None":
    if not config.encryption_keys:
        return None
    from .encryption import URLCipher  # imported only when keys are set: needs `cryptography`

    return URLCipher(config.encryption_keys)


def _isolation(
    config: TenancyConfig, engine: AsyncEngine, owner_engine: AsyncEngine | None, cipher: "URLCipher | None"
) -> Isolation:
    if config.backend == "sqlite":
        # Both strategies mean one file per tenant: SQLite has no schemas, and a
        # file is its database.
        if config.schema_template is not None:
            raise ConfigurationError("schema_template needs PostgreSQL (a template is a schema)")
        return SQLiteFileIsolation(
            config.database_url,
            prefix=config.schema_prefix,
            max_engines=config.max_cached_engines,
            echo=config.database_echo,
        )
    if config.isolation_strategy == "database":
        return _database_isolation(config, config.database_url, cipher)
    if config.isolation_strategy == "schema":
        return SchemaIsolation(
            engine,
            prefix=config.schema_prefix,
            max_cached_binds=config.cache_max_size,
            template=config.schema_template,
            # With tenant roles, the owner makes schemas and roles (the config requires it).
            ddl_engine=owner_engine if config.schema_tenant_roles else None,
            spares=config.schema_spares,
            shared_statements=config.schema_shared_statements,
            tenant_roles=config.schema_tenant_roles,
            cluster=CitusCluster(engine, mode=config.database_cluster),
        )
    assert owner_engine is not None  # the config requires it for rls and hybrid
    # One cluster for both tiers of hybrid: the tenant schemas and the shared tables.
    cluster = CitusCluster(owner_engine, mode=config.database_cluster)
    rls = RLSIsolation(
        engine,
        owner_engine,
        column=config.rls_tenant_column,
        namespace=config.rls_setting_namespace,
        prefix=config.schema_prefix,
        max_cached_binds=config.cache_max_size,
        cluster=cluster,
    )
    if config.isolation_strategy == "rls":
        return rls
    schema = SchemaIsolation(
        engine,
        prefix=config.schema_prefix,
        max_cached_binds=config.cache_max_size,
        template=config.schema_template,
        ddl_engine=owner_engine,
        shared_statements=config.schema_shared_statements,
        tenant_roles=config.schema_tenant_roles,
        cluster=cluster,
    )
    # The database tier's databases are created, and served, by the owner role: the
    # application role needs no CREATEDB, and reaches no tenant database by itself.
    assert config.database_owner_url is not None  # required with hybrid, like owner_engine
    database = _database_isolation(config, config.database_owner_url, cipher)
    return HybridIsolation(
        {"schema": schema, "database": database, "rls": rls},
        default_tier=config.hybrid_default_tier,
        plan_tiers=config.hybrid_plan_tiers,
        column=config.rls_tenant_column,
    )


def _database_isolation(
    config: TenancyConfig, server_url: str, cipher: "URLCipher | None"
) -> DatabaseIsolation:
    return DatabaseIsolation(
        server_url,
        prefix=config.schema_prefix,
        cipher=cipher,
        connection_budget=config.database_connection_budget,
        pool_size=config.database_tenant_pool_size,
        pool_timeout=config.database_pool_timeout,
        pool_recycle=config.database_pool_recycle,
        pool_pre_ping=config.database_pool_pre_ping,
        max_engines=config.max_cached_engines,
        pgbouncer=config.database_pgbouncer,
        echo=config.database_echo,
    )


def _invalidation(
    config: TenancyConfig, redis: Any, store: TenantStore, engine: AsyncEngine
) -> InvalidationChannel | None:
    if redis is not None:
        from .invalidation.redis import RedisInvalidation

        return RedisInvalidation(redis, prefix=config.redis_key_prefix)
    listen = store.notify_engine()
    if listen is not None:
        if config.database_pgbouncer and listen.url == engine.url:
            # LISTEN holds a session, which PgBouncer in transaction mode cannot give.
            logger.warning(
                "no cross-worker cache invalidation: LISTEN/NOTIFY does not work through PgBouncer "
                "in transaction mode; set redis_url, or other workers see changes after cache_ttl"
            )
            return None
        from .invalidation.postgres import PostgresInvalidation

        return PostgresInvalidation(listen)
    return None


def _rate_limiter(config: TenancyConfig, redis: Any) -> RateLimiter | None:
    if not config.rate_limit_enabled:
        return None
    if redis is not None:
        from .ratelimit.redis import RedisRateLimiter

        return RedisRateLimiter(
            redis,
            prefix=config.redis_key_prefix,
            requests=config.rate_limit_requests,
            window=config.rate_limit_window,
            plans=config.rate_limit_plans,
            fail_open=config.rate_limit_fail_open,
        )
    return MemoryRateLimiter(
        requests=config.rate_limit_requests,
        window=config.rate_limit_window,
        plans=config.rate_limit_plans,
        fail_open=config.rate_limit_fail_open,
    )
