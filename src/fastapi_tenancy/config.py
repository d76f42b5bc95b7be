"""`TenancyConfig`: every setting of the library, read from arguments or `TENANCY_*` variables."""

import ipaddress
import os
import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url

from .compat import LEGACY_SETTINGS, translate_legacy_settings
from .domain import validate_domain, validate_domain_suffix
from .resolution.algorithms import check_jwt_settings
from .resolution.path import validate_path_prefix
from .urls import mask_url, normalise_database_url

__all__ = ["TenancyConfig", "check_jwt_settings"]

_SCHEMA_BACKENDS = ("postgresql", "sqlite")
_DATABASE_BACKENDS = ("postgresql", "sqlite", "mysql")
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SCHEMA_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,29}")
_ResolverName = Literal["header", "subdomain", "domain", "path", "jwt"]
_SCHEMA_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_SQL_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SHARED_STRATEGIES = ("rls", "hybrid")
# fastapi-tenancy 0.5.0's settings we do not share (compat.py): the two cache switches
# are handled there too, apart from the table.
_LEGACY_NAMES = (*LEGACY_SETTINGS, "cache_enabled", "l1_cache_enabled")


class _LegacyEnvironment(PydanticBaseSettingsSource):
    """The `TENANCY_*` variables that name 0.5.0 settings, by setting name.

    The environment source reads only our fields' variables, so without this one a
    0.5.0 variable (`TENANCY_ENABLE_RATE_LIMITING`) would be ignored without a word;
    `compat.translate_legacy_settings` then translates or refuses each.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # not a source of our fields

    def __call__(self) -> dict[str, Any]:
        prefix = str(self.config.get("env_prefix", "")).upper()
        wanted = {f"{prefix}{name.upper()}": name for name in _LEGACY_NAMES}
        return {wanted[key.upper()]: value for key, value in os.environ.items() if key.upper() in wanted}


class TenancyConfig(BaseSettings):
    """All settings of fastapi-tenancy.

    Each field can also be set through the environment variable
    `TENANCY_<FIELD>` (for example `TENANCY_DATABASE_URL`); keyword arguments win
    over the environment. Invalid values and invalid combinations fail here, at
    construction, with a message naming the field. `repr()` and `str()` mask the
    password in `database_url`.

        config = TenancyConfig(database_url="postgresql+asyncpg://app@db/app")
    """

    model_config = SettingsConfigDict(
        env_prefix="TENANCY_",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )

    database_url: str = "sqlite+aiosqlite:///./tenancy.db"
    """Where the tenants live: `postgresql+asyncpg://...` in production, or the embedded
    SQLite default. `postgresql://`, `sqlite://` and `mysql://` are upgraded to the async
    driver. With SQLite, each tenant gets a database file beside this one."""

    resolution_strategy: Literal["header", "subdomain", "domain", "path", "jwt", "chain", "custom"] = "header"
    """How a request names its tenant: `header` reads `tenant_header_name`; `subdomain`
    the label before `domain_suffix`; `domain` the host: one of the tenants' custom domains
    (`add_domain`), or the label before `domain_suffix` when it is set; `path` the segment
    after `path_prefix`; `jwt` a claim of the verified bearer token; `chain` the
    strategies in `resolution_chain`; `custom` uses the resolver passed to
    `TenancyManager(resolver=...)`."""

    isolation_strategy: Literal["schema", "database", "rls", "hybrid"] = "schema"
    """How tenants' data is kept apart: `schema` gives each tenant its own PostgreSQL
    schema (on SQLite, its own database file); `database` gives each tenant its own
    database on PostgreSQL or MySQL/MariaDB (on SQLite, its own database file); `rls` keeps
    every tenant in shared tables guarded by PostgreSQL row-level security; `hybrid` places
    each tenant in a tier (`schema`, `database` or `rls`) chosen when it is registered."""

    tenant_header_name: str = "X-Tenant-ID"
    """The request header that carries the tenant identifier (header resolution)."""

    schema_prefix: str = "tenant_"
    """Prefix of every tenant's schema (or SQLite file) name: `acme-corp` becomes
    `tenant_acme_corp`. Lower-case letters, digits and `_`; must not start with `pg_`."""

    database_pool_size: int = Field(default=10, ge=1, le=1000)
    """Connections kept open in the manager's pool: the registry's and, on PostgreSQL,
    every tenant's (they share it). SQLite tenant files have small pools of their own."""

    database_max_overflow: int = Field(default=10, ge=0, le=1000)
    """Extra connections the pool may open under load, beyond `database_pool_size`. One that is
    given back while requests wait goes to one of them; otherwise it stays open for 5 s and
    closes if unused meanwhile (`fastapi_tenancy.pool.HandOffPool`; SQLAlchemy's own pool
    closes it at once, and reopens one for the next burst)."""

    database_pool_timeout: float = Field(default=30.0, gt=0)
    """Seconds a request waits for a free connection before failing with 503."""

    database_pool_recycle: int = Field(default=1800, ge=-1)
    """Seconds after which a pooled connection is replaced (-1: never)."""

    database_pool_pre_ping: bool = False
    """Test each connection with a round trip when it is taken from the pool. Off by
    default: it costs one round trip per request; turn it on behind unreliable networks."""

    database_echo: bool = False
    """Log every SQL statement (SQLAlchemy `echo`), for debugging."""

    database_pgbouncer: bool = False
    """`database_url` points to PgBouncer in transaction pooling mode: turn off asyncpg's
    server-side prepared statement cache and give each statement a unique name, since
    consecutive transactions may run on different server connections; and, since
    PgBouncer does not pass startup parameters on, set the tenant's search_path at the
    start of every transaction (one statement each) instead of relying on connections
    that start with an empty one."""

    # -- the registry cache: tenant records in memory (lookup.py), not the application
    # cache (cache/, the user's data) ------------------------------------------------

    cache_ttl: float = Field(default=30.0, ge=0)
    """Registry cache: seconds a resolved tenant is served from the manager's in-process
    cache of tenant records (0: no cache; the application cache, `TenantCache`, has its
    own TTL). Changes made through a manager invalidate it at once, in every process when
    there is an invalidation channel (`redis_url`, or a PostgreSQL registry); changes made
    any other way are seen after at most this long. Entries in use are re-read in the
    background, in batches, before they expire, so busy tenants never wait for the
    registry."""

    cache_max_size: int = Field(default=10_000, ge=1)
    """Registry cache: most tenants held (and, on PostgreSQL, their transaction settings
    kept ready); the oldest entry goes first."""

    negative_cache_ttl: float = Field(default=5.0, ge=0)
    """Registry cache: seconds an unknown identifier is remembered as unknown, so probing
    with random identifiers cannot hammer the registry (0: off). Registration clears it
    at once."""

    negative_cache_max_size: int = Field(default=10_000, ge=1)
    """Registry cache: most unknown identifiers remembered; bounded so probing cannot grow
    memory."""

    # -- the worker process --------------------------------------------------------------

    gc_freeze: bool = True
    """Freeze the start-up heap (`gc.freeze()`) when `initialize()` ends, so that Python's
    full garbage collections no longer walk the modules, the app and the library on the
    request path (about a tenth of the worker's CPU per request on the Quick Start); the
    last manager to close unfreezes it. An object in a reference cycle that was alive then
    and dies later is reclaimed only at that point. See docs/performance.md."""

    # -- per-tenant engines -------------------------------------------------------------

    max_cached_engines: int = Field(default=100, ge=1)
    """Most per-tenant engines kept open at once (SQLite: one file per tenant; with
    `isolation_strategy="database"`, one database per tenant); the least recently used
    engine not in use is closed when the limit is passed."""

    # -- database per tenant (isolation_strategy="database") --------------------------

    database_connection_budget: int = Field(default=50, ge=1, le=100_000)
    """Most connections this process holds open to tenant databases at once, across all
    tenants and servers (`isolation_strategy="database"`). A request that needs one more
    waits up to `database_pool_timeout` for one to free up (idle tenants' connections are
    closed first), then fails with 503. The registry's pool is not counted."""

    database_tenant_pool_size: int = Field(default=2, ge=1, le=1000)
    """Connections kept per tenant database (`isolation_strategy="database"`), with no
    overflow; at most `database_connection_budget` in all."""

    encryption_keys: list[SecretStr] = Field(default_factory=list)
    """Fernet keys (`cryptography`) that encrypt each tenant's own `database_url` at rest,
    as a JSON list in the environment. The first key encrypts, all of them decrypt: put a
    new key first to rotate, run `manager.rotate_encryption_keys()`, then drop the old one.
    Needed only to register tenants with a `database_url`."""

    # -- resolution strategies: subdomain, domain, path, JWT, chains, anti-enumeration ---

    domain_suffix: str | None = None
    """Subdomain and domain resolution: the domain tenants are subdomains of. With
    `example.com` (or `.example.com`), `acme.example.com` is tenant `acme`; the bare domain
    names none, and deeper hosts none either (with domain resolution, a deeper host is
    looked up among the custom domains, and only tenant `acme` may have one under
    `acme.example.com`). Required for subdomain resolution; optional for domain
    resolution. `tenant_url()` builds a tenant's URLs on its subdomain when it has no
    primary domain."""

    central_domains: tuple[str, ...] = ()
    """Domain resolution: hosts that belong to no tenant, such as your marketing site and
    your admin (JSON list, e.g. `["example.com", "admin.example.com"]`). They never
    resolve to a tenant (400), and no tenant can add them as a domain."""

    reserved_subdomains: tuple[str, ...] = ("www",)
    """Subdomain and domain resolution: labels before `domain_suffix` that never name a
    tenant (JSON list in the environment)."""

    trusted_proxies: tuple[str, ...] = ()
    """Subdomain and domain resolution: addresses or CIDR blocks of proxies whose
    `Forwarded: host=` (RFC 7239) and `X-Forwarded-Host` are believed (JSON list, e.g.
    `["10.0.0.0/8"]`). Empty: those headers are always ignored."""

    path_prefix: str = "/t"
    """Path resolution: the segments before the tenant's (`/t/acme/orders`). The app's
    routes are written without them; `""` puts the tenant first (`/acme/orders`)."""

    jwt_algorithms: tuple[str, ...] = ()
    """JWT resolution: the accepted signing algorithms, all HS* or all public-key
    (RS*, PS*, ES*, EdDSA); required with JWT resolution, e.g. `["RS256"]`."""

    jwt_secret: SecretStr | None = None
    """JWT resolution: the HMAC secret for HS* algorithms (at least as many bytes as the
    hash: 32 for HS256). Masked in `repr()`."""

    jwt_public_key: str | None = None
    """JWT resolution: the PEM public key for RS/PS/ES/EdDSA tokens (or use `jwt_jwks_url`)."""

    jwt_jwks_url: str | None = None
    """JWT resolution: the issuer's JWKS URL; keys are cached and refetched when a token
    names an unknown `kid` (key rotation)."""

    jwt_jwks_cache_ttl: float = Field(default=300.0, gt=0, le=86_400)
    """JWT resolution: seconds the JWKS keys are used before they are fetched again."""

    jwt_audience: str | None = None
    """JWT resolution: the required `aud` claim. Unset, tokens carrying an `aud` are refused."""

    jwt_issuer: str | None = None
    """JWT resolution: the required `iss` claim (unset: not checked)."""

    jwt_leeway: float = Field(default=0.0, ge=0, le=300)
    """JWT resolution: seconds of clock skew allowed for `exp`, `nbf` and `iat` (at most 300)."""

    jwt_tenant_claim: str = "tenant"
    """JWT resolution: the claim holding the tenant identifier; a dotted path (`org.slug`)
    reads nested claims."""

    jwt_require_exp: bool = True
    """JWT resolution: refuse tokens without `exp` (tokens that never expire)."""

    resolution_chain: tuple[_ResolverName, ...] = ()
    """Chain resolution: the strategies to ask, in order, e.g. `["jwt", "subdomain"]`."""

    resolution_chain_mode: Literal["first", "agree"] = "first"
    """Chain resolution: `first` takes the first answer; `agree` requires every strategy
    to name the same tenant and refuses a disagreement with 403."""

    anti_enumeration: bool = False
    """Answer unknown, suspended and deleted tenants with the same 404 `Tenant not found`,
    so responses do not reveal which identifiers exist."""

    maintenance_message: str = Field(default="Tenant is under maintenance", min_length=1, max_length=500)
    """The `detail` of the 503 answered for a tenant in maintenance (status `maintenance`,
    set by `manager.start_maintenance`, `migrate upgrade --maintenance` or a tier move)."""

    maintenance_retry_after: int = Field(default=120, ge=1, le=86_400)
    """Seconds in the `Retry-After` header of a tenant in maintenance's 503; jobs of such a
    tenant (ARQ, Celery) are retried after this long."""
    # -- Redis, cross-worker invalidation and rate limiting ------------------------------

    redis_url: str | None = None
    """Redis for deployments with many workers (`redis://host:6379/0`): changes made by any
    process reach every worker's registry cache through pub/sub, and the rate limiter
    counts there.
    Without it, a PostgreSQL registry carries the invalidations with LISTEN/NOTIFY and the
    rate limiter counts in process memory."""

    redis_key_prefix: str = "tenancy:"
    """Prefix of every Redis key and channel the library uses, so several applications
    (or environments) can share one Redis."""

    redis_timeout: float = Field(default=1.0, gt=0)
    """Seconds to wait for Redis (connect and each command) before treating it as down."""

    rate_limit_enabled: bool = False
    """Limit how many requests each tenant may make per `rate_limit_window`; excess
    requests get 429 with `Retry-After` and `RateLimit-*` headers."""

    rate_limit_requests: int = Field(default=100, ge=1)
    """Requests a tenant may make per window, unless its metadata or plan says otherwise.
    A burst of this many is admitted at once; after that, one per window/requests."""

    rate_limit_window: float = Field(default=60.0, gt=0)
    """Seconds of the rate-limit window."""

    rate_limit_plans: dict[str, int] = Field(default_factory=dict)
    """Requests per window by plan: a tenant whose metadata has `"plan": "pro"` gets
    `rate_limit_plans["pro"]`. In the environment, JSON: `{"free": 60, "pro": 600}`."""

    rate_limit_fail_open: bool = True
    """When the rate limiter's Redis is down: let requests through (true) or refuse them
    with 503 (false). Either way each failure is logged and counted."""

    tenant_max_concurrent_requests: int | None = Field(default=None, ge=1, le=100_000)
    """At most this many HTTP requests of one tenant inside the app at once, per worker
    process (None: no cap). With a shared pool (schema or RLS isolation) set it below the
    pool's size plus overflow, so one tenant flooding slow requests leaves connections for
    the others. Requests beyond it wait `tenant_concurrency_wait`, then get 429."""

    tenant_concurrency_wait: float = Field(default=0.0, ge=0, le=300)
    """Seconds a request over `tenant_max_concurrent_requests` waits in its tenant's queue
    for a slot (holding no connection) before it is refused with 429 and `Retry-After: 1`;
    0 refuses it at once."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        legacy = _LegacyEnvironment(settings_cls)
        return init_settings, env_settings, legacy, dotenv_settings, file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _translate_legacy(cls, data: Any) -> Any:
        # fastapi-tenancy 0.5.0 names, given as arguments or variables: translated with a
        # DeprecationWarning where the meaning is exactly ours, refused otherwise.
        if isinstance(data, dict) and any(name in data for name in _LEGACY_NAMES):
            return translate_legacy_settings(data)
        return data

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("not a Redis URL (expected redis://, rediss:// or unix://)")
        return value

    @field_validator("rate_limit_plans")
    @classmethod
    def _check_plans(cls, value: dict[str, int]) -> dict[str, int]:
        for plan, requests in value.items():
            if requests < 1:
                raise ValueError(f"plan {plan!r}: requests per window must be at least 1")
        return value

    # -- fleet operations: fast provisioning -------------------------------------------

    schema_template: str | None = None
    """PostgreSQL: a schema kept at the current migration head that each new tenant's
    schema is cloned from, so registration takes milliseconds instead of running every
    migration or `create_all`. `fastapi-tenancy migrate upgrade` creates and upgrades it
    with the tenants. Must not start with `schema_prefix`. Unset: tables are created
    from `app_metadata`."""

    alembic_config: str | None = None
    """The `alembic.ini` of the project `fastapi-tenancy migrate init` made (its `tenant`
    section): set, tenants' migrations are known to the library. A tenant registered from
    `app_metadata` (or a template without a revision) is stamped at the head revision, one
    registered with no tables at all is migrated to head, `fastapi-tenancy migrate` uses
    this file, and `doctor` fails for a tenant that is not at head. PostgreSQL only.
    Unset: registration makes tables without recording a revision."""

    schema_shared_statements: bool = True
    """PostgreSQL schema isolation: one SQL text for every tenant (names resolve through
    the tenant's `search_path`, sent with `BEGIN`), so the driver's prepared-statement
    cache holds one entry per statement however many tenants there are. Switched off
    by itself when tenant schemas hold types of their own (native ENUM, DOMAIN,
    composite: result types then differ between tenants); set `false` to always write
    the tenant's schema into each statement instead."""

    schema_tenant_roles: bool = False
    """PostgreSQL schema isolation (and hybrid's schema tier): a `NOLOGIN` role per tenant
    schema, and each tenant transaction runs as it (`SET LOCAL ROLE`, sent with `BEGIN`), so
    SQL naming another tenant's schema is refused by PostgreSQL. Needs `database_owner_url`
    (a role with `CREATEROLE` that owns the tenant schemas) and a `database_url` role that
    is no superuser (and `NOINHERIT` before PostgreSQL 16). See docs/isolation.md."""

    # -- row-level security and hybrid tiers ------------------------------------------

    database_owner_url: str | None = None
    """The URL of the role that owns the shared tables (`rls`, `hybrid`): the library runs
    DDL (tables, policies, tenant schemas) and the tenant registry with it, while requests
    run as the role of `database_url`, which must not own those tables, be a superuser or
    have BYPASSRLS. Required for `rls`, `hybrid` and `schema_tenant_roles`."""

    rls_tenant_column: str = "tenant_id"
    """The column that names a row's tenant (`rls`): every table of the app metadata that
    has it is shared and guarded by a policy; the library fills it on insert."""

    rls_setting_namespace: str = "fastapi_tenancy"
    """Namespace of the transaction-local setting that binds a transaction to its tenant
    (`<namespace>.tenant_id`), read by the policies."""

    hybrid_default_tier: Literal["schema", "database", "rls"] = "rls"
    """The tier of a tenant registered without `tier=` whose metadata `plan` is not in
    `hybrid_plan_tiers` (`hybrid`)."""

    hybrid_plan_tiers: dict[str, Literal["schema", "database", "rls"]] = Field(default_factory=dict)
    """Tier by plan (`hybrid`): a tenant registered with metadata `{"plan": "enterprise"}`
    goes to `hybrid_plan_tiers["enterprise"]`. As JSON in the environment:
    `{"enterprise": "schema", "free": "rls"}`."""
    # -- fleet operations: spare schemas ---------------------------------------------------

    schema_spares: int = Field(default=0, ge=0, le=1000)
    """PostgreSQL, with `schema_template`: how many spare schemas (clones of the
    template made ahead of time) to keep ready. Registration then renames one instead
    of cloning (one catalog update), and a background fill replaces it. 0 (default):
    no spares. See docs/migrations.md."""

    # -- scaling out: a Citus cluster -------------------------------------------------------

    database_cluster: Literal["auto", "citus", "none"] = "auto"
    """PostgreSQL schema, row-level security and hybrid isolation on a Citus cluster
    (docs/scaling-out.md): `auto` looks for the `citus` extension in `database_url`'s
    database at `initialize()` and, when it is there, creates each tenant's schema as a
    distributed schema, placed whole on one worker node, and distributes row-level
    security's shared tables by the tenant column; `citus` requires the extension
    (`initialize()` refuses to start without it, and `doctor` fails); `none` never
    distributes anything."""

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("database_owner_url")
    @classmethod
    def _check_database_owner_url(cls, value: str | None) -> str | None:
        return None if value is None else normalise_database_url(value)

    @field_validator("rls_tenant_column", "rls_setting_namespace")
    @classmethod
    def _check_sql_name(cls, value: str) -> str:
        if _SQL_NAME.fullmatch(value) is None:
            raise ValueError("must be 1-63 lower-case letters, digits or '_', not starting with a digit")
        return value

    @field_validator("tenant_header_name")
    @classmethod
    def _check_header_name(cls, value: str) -> str:
        if _HEADER_TOKEN.fullmatch(value) is None:
            raise ValueError("not a valid HTTP header name")
        return value

    @field_validator("schema_prefix")
    @classmethod
    def _check_schema_prefix(cls, value: str) -> str:
        if _SCHEMA_PREFIX.fullmatch(value) is None or value.startswith("pg_"):
            raise ValueError(
                "must be 1-30 lower-case letters, digits or '_', start with a letter, "
                "and not start with 'pg_'"
            )
        return value

    @field_validator("domain_suffix")
    @classmethod
    def _check_domain_suffix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # ".example.com" (0.5.0's form) names the same domain.
        return validate_domain_suffix(value.strip().removeprefix("."))

    @field_validator("central_domains")
    @classmethod
    def _check_central_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(validate_domain(name) for name in value)

    @field_validator("reserved_subdomains")
    @classmethod
    def _check_reserved(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(label.strip().lower() for label in value)

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            try:
                ipaddress.ip_network(address.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"{address!r} is not an IP address or CIDR block") from exc
        return value

    @field_validator("path_prefix")
    @classmethod
    def _check_path_prefix(cls, value: str) -> str:
        return validate_path_prefix(value)

    @field_validator("jwt_tenant_claim")
    @classmethod
    def _check_tenant_claim(cls, value: str) -> str:
        if not value or any(not part for part in value.split(".")):
            raise ValueError("must be a claim name or a dotted path such as 'org.slug'")
        return value

    @field_validator("schema_template")
    @classmethod
    def _check_schema_template(cls, value: str | None) -> str | None:
        if value is not None and (_SCHEMA_NAME.fullmatch(value) is None or value.startswith("pg_")):
            raise ValueError("must be 1-63 lower-case letters, digits or '_', start with a letter, not 'pg_'")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> "TenancyConfig":
        self._check_resolution()
        backend = self.backend
        if self.database_pgbouncer and backend != "postgresql":
            raise ValueError(
                f"database_pgbouncer: PgBouncer fronts PostgreSQL, but database_url is {backend}"
            )
        if self.isolation_strategy == "database" and backend not in _DATABASE_BACKENDS:
            raise ValueError(
                "isolation_strategy: 'database' needs PostgreSQL, MySQL/MariaDB or SQLite, "
                f"but database_url is {backend}"
            )
        if self.database_tenant_pool_size > self.database_connection_budget:
            raise ValueError(
                "database_tenant_pool_size: a tenant's pool cannot be larger than "
                f"database_connection_budget ({self.database_connection_budget})"
            )
        if self.isolation_strategy == "schema" and backend not in _SCHEMA_BACKENDS:
            raise ValueError(
                f"isolation_strategy: 'schema' needs PostgreSQL or SQLite, but database_url is {backend}"
            )
        if self.schema_template is not None and self.schema_template.startswith(self.schema_prefix):
            raise ValueError(
                "schema_template must not start with schema_prefix (it would be a tenant's name)"
            )
        if self.isolation_strategy in _SHARED_STRATEGIES:
            if backend != "postgresql":
                raise ValueError(
                    f"isolation_strategy: {self.isolation_strategy!r} needs PostgreSQL, "
                    f"but database_url is {backend}"
                )
            if self.database_owner_url is None:
                raise ValueError(
                    f"database_owner_url: isolation_strategy {self.isolation_strategy!r} needs the URL of "
                    "the role that owns the shared tables, besides database_url (the application role)"
                )
            if make_url(self.database_owner_url).get_backend_name() != "postgresql":
                raise ValueError("database_owner_url: must be a PostgreSQL URL, like database_url")
        if self.schema_tenant_roles:
            if backend != "postgresql" or self.isolation_strategy not in ("schema", "hybrid"):
                raise ValueError(
                    "schema_tenant_roles: a role per tenant schema needs PostgreSQL and "
                    f"isolation_strategy 'schema' or 'hybrid' (have {backend}, {self.isolation_strategy!r})"
                )
            if self.database_owner_url is None:
                raise ValueError(
                    "database_owner_url: schema_tenant_roles needs the URL of a role with CREATEROLE "
                    "that owns the tenant schemas, besides database_url (the application role)"
                )
            if make_url(self.database_owner_url).get_backend_name() != "postgresql":
                raise ValueError("database_owner_url: must be a PostgreSQL URL, like database_url")
        if self.schema_spares and self.schema_template is None:
            raise ValueError("schema_spares: spare schemas are clones of the template; set schema_template")
        if self.schema_spares and self.isolation_strategy != "schema":
            raise ValueError("schema_spares: spare schemas serve isolation_strategy='schema' only")
        if self.database_cluster == "citus" and backend != "postgresql":
            raise ValueError(
                f"database_cluster: Citus is a PostgreSQL extension, but database_url is {backend}"
            )
        if self.database_cluster == "citus" and self.isolation_strategy == "database":
            raise ValueError(
                "database_cluster: the library distributes tenant schemas and row-level security's "
                "shared tables (isolation_strategy 'schema', 'rls' or 'hybrid'), not a database per tenant"
            )
        return self

    def _check_resolution(self) -> None:
        strategy = self.resolution_strategy
        if strategy == "chain" and not self.resolution_chain:
            raise ValueError("resolution_chain: list the strategies to chain, e.g. ['jwt', 'subdomain']")
        used = set(self.resolution_chain) if strategy == "chain" else {strategy}
        if "subdomain" in used and self.domain_suffix is None:
            raise ValueError("domain_suffix: required for subdomain resolution, e.g. 'example.com'")
        if "jwt" in used:
            secret = self.jwt_secret.get_secret_value().encode() if self.jwt_secret is not None else None
            check_jwt_settings(self.jwt_algorithms, secret, self.jwt_public_key, self.jwt_jwks_url)
        if self.anti_enumeration and (self.cache_ttl == 0) != (self.negative_cache_ttl == 0):
            # One answer cached and the other read from the registry every time would
            # tell them apart by timing.
            raise ValueError(
                "anti_enumeration: cache_ttl and negative_cache_ttl must be both on or both 0, "
                "or known and unknown tenants answer at different speeds"
            )

    @property
    def backend(self) -> str:
        """The database backend of `database_url`: `postgresql`, `sqlite` or `mysql`."""
        backend = make_url(self.database_url).get_backend_name()
        return "mysql" if backend == "mariadb" else backend

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            masked = name in ("database_url", "database_owner_url", "redis_url") and value is not None
            yield name, mask_url(value) if masked else value
