"""`TenancyConfig`: every setting of the library, read from arguments or `TENANCY_*` variables."""

import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

__all__ = ["TenancyConfig"]

# The async driver we use for each backend; a URL naming the bare backend (or a
# sync driver) is normalised to it once, here.
_ASYNC_DRIVERS = {
    "postgresql": "asyncpg",
    "sqlite": "aiosqlite",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
}
_OTHER_ASYNC_DRIVERS = {"mysql": ("asyncmy",), "mariadb": ("asyncmy",)}
_SCHEMA_BACKENDS = ("postgresql", "sqlite")
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SCHEMA_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,29}")
_SQL_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SHARED_STRATEGIES = ("rls", "hybrid")


def normalise_database_url(url: str) -> str:
    """Return `url` with the async driver this library uses for its backend.

    `postgresql://` becomes `postgresql+asyncpg://`, `sqlite://` becomes
    `sqlite+aiosqlite://`, `mysql://` becomes `mysql+aiomysql://`. Raises
    `ValueError` for an unparsable URL or a backend we do not support.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError("not a database URL (expected e.g. postgresql+asyncpg://...)") from exc
    backend, _, driver = parsed.drivername.partition("+")
    backend = {"postgres": "postgresql"}.get(backend, backend)
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(f"unsupported database backend {backend!r}; use one of {sorted(_ASYNC_DRIVERS)}")
    if driver not in (_ASYNC_DRIVERS[backend], *_OTHER_ASYNC_DRIVERS.get(backend, ())):
        parsed = parsed.set(drivername=f"{backend}+{_ASYNC_DRIVERS[backend]}")
    return parsed.render_as_string(hide_password=False)


def mask_url(url: str) -> str:
    """Return `url` with its password replaced by `***` (for logs and reprs)."""
    try:
        parsed: URL = make_url(url)
    except ArgumentError:
        return "***"
    return parsed.render_as_string(hide_password=True)


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

    resolution_strategy: Literal["header", "custom"] = "header"
    """How a request names its tenant: `header` reads `tenant_header_name`; `custom`
    uses the resolver passed to `TenancyManager(resolver=...)`."""

    isolation_strategy: Literal["schema", "rls", "hybrid"] = "schema"
    """How tenants' data is kept apart: `schema` gives each tenant its own PostgreSQL
    schema (on SQLite, its own database file); `rls` keeps every tenant in shared tables
    guarded by PostgreSQL row-level security; `hybrid` places each tenant in a tier
    (`schema` or `rls`) chosen when it is registered."""

    tenant_header_name: str = "X-Tenant-ID"
    """The request header that carries the tenant identifier (header resolution)."""

    schema_prefix: str = "tenant_"
    """Prefix of every tenant's schema (or SQLite file) name: `acme-corp` becomes
    `tenant_acme_corp`. Lower-case letters, digits and `_`; must not start with `pg_`."""

    database_pool_size: int = Field(default=10, ge=1, le=1000)
    """Connections kept open in the manager's pool: the registry's and, on PostgreSQL,
    every tenant's (they share it). SQLite tenant files have small pools of their own."""

    database_max_overflow: int = Field(default=10, ge=0, le=1000)
    """Extra connections the pool may open under load, beyond `database_pool_size`."""

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

    cache_ttl: float = Field(default=30.0, ge=0)
    """Seconds a resolved tenant is served from the in-process cache (0: no cache).
    Changes made through this process's manager invalidate it at once; other
    processes see them after at most this long."""

    cache_max_size: int = Field(default=10_000, ge=1)
    """Most tenants held in the in-process cache (and, on PostgreSQL, per-tenant engine
    views kept ready); the oldest entry goes first."""

    negative_cache_ttl: float = Field(default=5.0, ge=0)
    """Seconds an unknown identifier is remembered as unknown, so probing with random
    identifiers cannot hammer the registry (0: off). Registration clears it at once."""

    negative_cache_max_size: int = Field(default=10_000, ge=1)
    """Most unknown identifiers remembered; bounded so probing cannot grow memory."""

    max_cached_engines: int = Field(default=100, ge=1)
    """Most per-tenant engines kept open at once (SQLite: one file per tenant); the least
    recently used is closed when the limit is passed."""

    # -- row-level security and hybrid tiers ------------------------------------------

    database_owner_url: str | None = None
    """The URL of the role that owns the shared tables (`rls`, `hybrid`): the library runs
    DDL (tables, policies, tenant schemas) and the tenant registry with it, while requests
    run as the role of `database_url`, which must not own those tables, be a superuser or
    have BYPASSRLS. Required for `rls` and `hybrid`."""

    rls_tenant_column: str = "tenant_id"
    """The column that names a row's tenant (`rls`): every table of the app metadata that
    has it is shared and guarded by a policy; the library fills it on insert."""

    rls_setting_namespace: str = "fastapi_tenancy"
    """Namespace of the transaction-local setting that binds a transaction to its tenant
    (`<namespace>.tenant_id`), read by the policies."""

    hybrid_default_tier: Literal["schema", "rls"] = "rls"
    """The tier of a tenant registered without `tier=` whose metadata `plan` is not in
    `hybrid_plan_tiers` (`hybrid`)."""

    hybrid_plan_tiers: dict[str, Literal["schema", "rls"]] = Field(default_factory=dict)
    """Tier by plan (`hybrid`): a tenant registered with metadata `{"plan": "enterprise"}`
    goes to `hybrid_plan_tiers["enterprise"]`. As JSON in the environment:
    `{"enterprise": "schema", "free": "rls"}`."""

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

    @model_validator(mode="after")
    def _check_combinations(self) -> "TenancyConfig":
        backend = self.backend
        if self.database_pgbouncer and backend != "postgresql":
            raise ValueError(
                f"database_pgbouncer: PgBouncer fronts PostgreSQL, but database_url is {backend}"
            )
        if self.isolation_strategy == "schema" and backend not in _SCHEMA_BACKENDS:
            raise ValueError(
                f"isolation_strategy: 'schema' needs PostgreSQL or SQLite, but database_url is {backend}"
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
        return self

    @property
    def backend(self) -> str:
        """The database backend of `database_url`: `postgresql`, `sqlite` or `mysql`."""
        backend = make_url(self.database_url).get_backend_name()
        return "mysql" if backend == "mariadb" else backend

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            masked = name in ("database_url", "database_owner_url") and value is not None
            yield name, mask_url(value) if masked else value
