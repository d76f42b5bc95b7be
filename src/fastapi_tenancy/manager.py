"""`TenancyManager`: the parts' lifecycle and the request path; tenant changes go to `admin.py`."""

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.requests import HTTPConnection

from ._utils import unavailable_as_503
from .admin import TenantAdmin
from .audit import AuditWriter
from .builder import build_parts
from .cloning import clone_tenant
from .config import TenancyConfig
from .context import current_tenant
from .domain import Domain
from .errors import TenantInactiveError, TenantMaintenanceError, TenantNotFoundError, TenantResolutionError
from .events import LifecycleEvents
from .invalidation.base import InvalidationChannel
from .invalidation.record import check_channel
from .isolation.base import Isolation
from .lookup import TenantLookup
from .ratelimit.base import RateLimiter
from .resolution.base import Resolver, ResolverFunc
from .storage.base import TenantStore
from .tenant import Tenant, TenantStatus

if TYPE_CHECKING:  # optional extras: `cryptography`; Jinja2 (console); prometheus-client
    from .console import Console, OperatorAuth
    from .encryption import URLCipher
    from .metrics import TenantMetrics

__all__ = ["TenancyManager"]

_Session = TypeVar("_Session", bound=AsyncSession)


class TenancyManager:
    """The composition root: one per application, shared by all its requests.

    Builds the resolver, the isolation strategy, the lookup cache and the
    database engine from `config`, and owns their lifecycles. It is also the
    only way to change tenants, so that every change invalidates the cache:
    its tenant methods (`register_tenant`, `update_tenant`, ...) call its
    `admin`, a `TenantAdmin` over the same parts.

        manager = TenancyManager(config, SQLAlchemyTenantStore(config.database_url))
        await manager.initialize()
        tenant = await manager.register_tenant("acme-corp", "Acme", app_metadata=Base.metadata)

    `store` defaults to a `SQLAlchemyTenantStore` sharing the manager's engine.
    With `redis_url` set, every change is announced to all workers over Redis
    (else, with the registry in PostgreSQL, over LISTEN/NOTIFY), and with
    `rate_limit_enabled` the middleware asks `rate_limiter` before each request.
    Pass `resolver=` (a `Resolver` or an async function of the request) with
    `resolution_strategy="custom"`, and `isolation=` to supply your own strategy.
    Every lifecycle change is written to the audit log (`audit=`, default a
    `tenancy_audit_log` table in the registry database) and passed to the hooks
    registered on `manager.events`.
    """

    def __init__(
        self,
        config: TenancyConfig | None = None,
        store: TenantStore | None = None,
        *,
        resolver: Resolver | ResolverFunc | None = None,
        isolation: Isolation | None = None,
        audit: AuditWriter | None = None,
    ) -> None:
        self.config = config if config is not None else TenancyConfig()
        parts = build_parts(self.config, store=store, resolver=resolver, isolation=isolation, audit=audit)
        self.engine: AsyncEngine = parts.engine
        # The role that owns the shared tables (rls, hybrid): DDL and the registry run as
        # it, requests as the role of database_url.
        self.owner_engine: AsyncEngine | None = parts.owner_engine
        self.store: TenantStore = parts.store
        self.resolver: Resolver = parts.resolver
        self.cipher: URLCipher | None = parts.cipher
        self.isolation: Isolation = parts.isolation
        self.lookup: TenantLookup = parts.lookup
        self.events: LifecycleEvents = parts.events
        # Redis, when configured, is shared by the invalidation channel and the limiter.
        self.redis: Any = parts.redis
        self.invalidation: InvalidationChannel | None = parts.invalidation
        self.rate_limiter: RateLimiter | None = parts.rate_limiter
        self.admin = TenantAdmin(
            store=self.store,
            isolation=self.isolation,
            lookup=self.lookup,
            events=self.events,
            invalidation=self.invalidation,
            cipher=self.cipher,
            stamper=parts.stamper,
            domains=parts.domains,
        )
        # Your steps after a new tenant's storage exists (`@manager.provisioning.step`).
        self.provisioning = self.admin.provisioning
        self._lifecycle_lock = asyncio.Lock()
        self._initialized = False

    # -- lifecycle -----------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether `initialize()` has run (and `close()` not since): its pools may be open."""
        return self._initialized

    async def initialize(self) -> None:
        """Create the registry table and open the pool. Idempotent; call at startup."""
        async with self._lifecycle_lock:
            if self._initialized:
                return
            await self.store.initialize()
            # Before anything else starts: a process on another channel than the registry's
            # other processes would miss their changes, and they its (invalidation/record.py).
            await check_channel(self.store, self.invalidation)
            await self.isolation.initialize()
            await self.events.initialize()
            async with unavailable_as_503("database"), self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))  # warm the pool: fail now, not on the first request
            if self.rate_limiter is not None:
                await self.rate_limiter.initialize()
            if self.invalidation is not None:
                # Not fatal when down: the channel retries, dropping the cache meanwhile.
                await self.invalidation.start(self.lookup.invalidate, self.lookup.clear)
            self._initialized = True

    async def close(self) -> None:
        """Close every pool and forget cached tenants. Idempotent; call at shutdown."""
        async with self._lifecycle_lock:
            # Background registrations first: each is undone while the parts still work.
            await self.provisioning.close()
            if self.invalidation is not None:
                await self.invalidation.close()
            if self.rate_limiter is not None:
                await self.rate_limiter.close()
            if self.redis is not None:
                await self.redis.aclose()
            await self.isolation.close()
            await self.events.close()
            await self.store.close()
            await self.engine.dispose()
            if self.owner_engine is not None:
                await self.owner_engine.dispose()
            self.lookup.clear()
            self._initialized = False

    def create_lifespan(self) -> Callable[[Any], AbstractAsyncContextManager[None]]:
        """A FastAPI `lifespan`: `initialize()` at startup, `close()` at shutdown.

            app = FastAPI(lifespan=manager.create_lifespan())

        Write your own lifespan instead when the app has more to start and stop.
        """

        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            await self.initialize()
            try:
                yield
            finally:
                await self.close()

        return lifespan

    # -- the request path ----------------------------------------------------------

    async def resolve(self, connection: HTTPConnection) -> Tenant:
        """The active tenant a request names; raises the 400/404/403 errors otherwise.

        With `anti_enumeration`, a tenant that is not active is refused exactly like an
        unknown one (404): the same lookup ran either way, only the answer is chosen here.
        """
        identifier = await self.resolver.resolve(connection)
        if not identifier:
            raise TenantResolutionError()
        tenant = await self.lookup.get(identifier)
        if tenant is None:
            raise TenantNotFoundError()
        if tenant.status is not TenantStatus.ACTIVE:
            # Maintenance is a 503 even under anti_enumeration: the tenant's own users are to
            # come back (Retry-After), not be told it does not exist.
            if self.config.anti_enumeration and tenant.status is not TenantStatus.MAINTENANCE:
                raise TenantNotFoundError(f"tenant {identifier!r} is {tenant.status.value}")
            self.ensure_active(tenant)
        return tenant

    def ensure_active(self, tenant: Tenant) -> None:
        """Raise unless `tenant` (as read from the registry or its cache) may be served now.

        `TenantMaintenanceError` (503, `Retry-After: maintenance_retry_after`, the detail
        `maintenance_message`) for a tenant in maintenance; `TenantInactiveError` (403)
        for any other status but `active`. A status check on the record: no I/O.
        """
        if tenant.status is TenantStatus.ACTIVE:
            return
        if tenant.status is TenantStatus.MAINTENANCE:
            raise TenantMaintenanceError(self.config.maintenance_message, self.config.maintenance_retry_after)
        raise TenantInactiveError(tenant.status.value)

    @overload
    def session(
        self, tenant: Tenant | str | None = None, *, during_maintenance: bool = False
    ) -> AbstractAsyncContextManager[AsyncSession]: ...
    @overload
    def session(
        self,
        tenant: Tenant | str | None = None,
        *,
        during_maintenance: bool = False,
        session_class: type[_Session],
    ) -> AbstractAsyncContextManager[_Session]: ...
    @asynccontextmanager
    async def session(
        self,
        tenant: Tenant | str | None = None,
        *,
        during_maintenance: bool = False,
        session_class: type[AsyncSession] = AsyncSession,
    ) -> AsyncIterator[Any]:  # Any: an instance of `session_class` (see the overloads)
        """An `AsyncSession` that reaches only `tenant`'s data (default: the current tenant).

        `tenant` is a `Tenant` or an identifier (`manager.session("acme-corp")`).
        `session_class` is an `AsyncSession` subclass to use instead (SQLModel's, for
        `session.exec()`), scoped the same way.
        Not begun: use it directly (it begins on first use) or with
        `async with session.begin()`. Uncommitted work is rolled back on exit.
        The tenant's status is checked against the registry (through the lookup
        cache), not the `Tenant` object passed in: a job holding a record from
        before a suspension is refused, and so is one whose tenant was purged and
        its slug registered again by someone else. A tenant in maintenance is refused
        with `TenantMaintenanceError` (503), unless `during_maintenance=True`: for the
        operator's own work on it (a data fix while its requests are held off).
        """
        if tenant is None:
            tenant = current_tenant()
        identifier = tenant if isinstance(tenant, str) else tenant.identifier
        current = await self.lookup.get(identifier)
        if current is None or (isinstance(tenant, Tenant) and current.id != tenant.id):
            raise TenantNotFoundError(f"no tenant {identifier!r:.80}")
        if not (during_maintenance and current.status is TenantStatus.MAINTENANCE):
            self.ensure_active(current)
        session = await self.isolation.session(current, session_class=session_class)
        async with session:
            yield session

    # -- tenant administration: `TenantAdmin` (admin.py) has the full story -------------

    async def register_tenant(
        self,
        identifier: str,
        name: str,
        *,
        app_metadata: sa.MetaData | None = None,
        metadata: Mapping[str, Any] | None = None,
        database_url: str | None = None,
        tier: str | None = None,
        background: bool = False,
    ) -> Tenant:
        """Register a tenant, create its storage and tables, run the provisioning steps; then active.

        See `TenantAdmin.register_tenant`: a failed provisioning is undone and
        raises `ProvisioningError`; a taken slug raises `TenantAlreadyExistsError`.
        `background=True` returns the tenant still `provisioning` and finishes in a job
        of this process (`manager.provisioning.job(identifier)`).
        """
        return await self.admin.register_tenant(
            identifier,
            name,
            app_metadata=app_metadata,
            metadata=metadata,
            database_url=database_url,
            tier=tier,
            background=background,
        )

    async def seed_tenant(self, tenant: Tenant | str, *, steps: Iterable[str] | None = None) -> list[str]:
        """Run the provisioning steps (all, or `steps` by name) for an existing tenant; their names.

        See `TenantAdmin.seed_tenant` (and `fastapi-tenancy tenants seed`).
        """
        return await self.admin.seed_tenant(tenant, steps=steps)

    async def clone_tenant(
        self,
        source: Tenant | str,
        identifier: str,
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        app_metadata: sa.MetaData | None = None,
    ) -> Tenant:
        """Register `identifier` with a consistent copy of `source`'s data; see `cloning.clone_tenant`."""
        return await clone_tenant(
            self.admin, source, identifier, name=name, metadata=metadata, app_metadata=app_metadata
        )

    async def rotate_encryption_keys(self) -> int:
        """Re-encrypt every tenant's `database_url` under the first key; how many changed."""
        return await self.admin.rotate_encryption_keys()

    async def get_tenant(self, identifier: str) -> Tenant:
        """The tenant with this identifier, read from the registry (not the cache)."""
        return await self.admin.get_tenant(identifier)

    async def get_tenant_by_id(self, tenant_id: str) -> Tenant:
        """The tenant with this id, read from the registry."""
        return await self.admin.get_tenant_by_id(tenant_id)

    async def list_tenants(
        self, *, status: TenantStatus | None = None, after: str | None = None, limit: int = 100
    ) -> list[Tenant]:
        """Tenants ordered by identifier; page with `after=<last identifier seen>`."""
        return await self.admin.list_tenants(status=status, after=after, limit=limit)

    async def update_tenant(
        self,
        tenant: Tenant | str | None = None,
        *,
        tenant_id: str | None = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        metadata_patch: Mapping[str, Any] | None = None,
    ) -> Tenant:
        """Change a tenant's name and/or metadata (`metadata` replaces, `metadata_patch` merges).

        Prefer `metadata_patch` under concurrency; see `TenantAdmin.update_tenant`.
        """
        return await self.admin.update_tenant(
            tenant, tenant_id=tenant_id, name=name, metadata=metadata, metadata_patch=metadata_patch
        )

    async def suspend_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Stop serving a tenant (403) and keep its data. Reversible with `activate_tenant`.

        The tenant is a `Tenant`, an identifier, or an id given as `tenant_id=`.
        """
        return await self.admin.suspend_tenant(tenant, tenant_id=tenant_id)

    async def activate_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Serve a suspended tenant again."""
        return await self.admin.activate_tenant(tenant, tenant_id=tenant_id)

    async def delete_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None, destroy_data: bool = False
    ) -> None:
        """Delete a tenant: soft (data and slug kept) or, with `destroy_data=True`, for good."""
        await self.admin.delete_tenant(tenant, tenant_id=tenant_id, destroy_data=destroy_data)

    async def start_maintenance(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Put an active tenant in maintenance: its requests get 503 with `Retry-After`.

        See `TenantAdmin.start_maintenance`; `end_maintenance` serves it again.
        """
        return await self.admin.start_maintenance(tenant, tenant_id=tenant_id)

    async def end_maintenance(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Serve a tenant in maintenance again (any other status is left as it is)."""
        return await self.admin.end_maintenance(tenant, tenant_id=tenant_id)

    @asynccontextmanager
    async def maintenance(self, tenant: Tenant | str) -> AsyncIterator[Tenant]:
        """Hold an active tenant in maintenance for an `async with` block; see `TenantAdmin.maintenance`.

        Its requests get 503 meanwhile, in every worker:
        `async with manager.maintenance("acme-corp"): ...`
        """
        async with self.admin.maintenance(tenant) as held:
            yield held

    async def move_tenant(
        self, tenant: Tenant | str, tier: str, *, app_metadata: sa.MetaData, maintenance: bool = False
    ) -> Tenant:
        """Move a live tenant to another tier (hybrid isolation); see `TenantAdmin.move_tenant`.

        `maintenance=True` answers its requests 503 in every worker for the move's duration.
        """
        return await self.admin.move_tenant(tenant, tier, app_metadata=app_metadata, maintenance=maintenance)

    async def remove_old_copy(self, tenant: Tenant | str) -> None:
        """Delete the copy a `move_tenant` left in the tenant's previous tier. Irreversible."""
        await self.admin.remove_old_copy(tenant)

    async def adopt_storage(self, tenant: Tenant | str) -> bool:
        """Mark the storage found under a registered tenant's name as its own.

        For storage made outside the library, which tenant sessions refuse until then.
        True when it wrote the marker; see `TenantAdmin.adopt_storage`.
        """
        return await self.admin.adopt_storage(tenant)

    # -- the operator console ------------------------------------------------------------

    def console(
        self,
        *,
        auth: "OperatorAuth | None" = None,
        metrics: "TenantMetrics | None" = None,
        app_metadata: sa.MetaData | None = None,
        **options: Any,
    ) -> "Console":
        """The operator console over this manager, an ASGI app to mount (needs the `console` extra).

            app.mount("/_tenancy", manager.console(auth=require_operator, metrics=metrics))

        `auth` is required: a FastAPI dependency returning the operator's name (every
        change is audited under it) and refusing everyone else. Other options: see
        `fastapi_tenancy.console.Console`. Exclude its path from `TenancyMiddleware`.
        """
        from .console import Console  # noqa: PLC0415 - Jinja2, the console extra

        return Console(self, auth=auth, metrics=metrics, app_metadata=app_metadata, **options)

    # -- custom domains: `TenantAdmin` (admin.py) has the rules --------------------------

    async def add_domain(self, tenant: Tenant | str, domain: str, *, primary: bool = False) -> Domain:
        """Give the host name `domain` to a tenant (`primary=True`: its primary domain).

        Raises `InvalidDomainError` for a name no tenant can have (central, under another
        tenant's subdomain, malformed), `DomainTakenError` if another tenant holds it.
        """
        return await self.admin.add_domain(tenant, domain, primary=primary)

    async def remove_domain(self, tenant: Tenant | str, domain: str) -> None:
        """Take the host name `domain` from a tenant; `DomainNotFoundError` if it is not its."""
        await self.admin.remove_domain(tenant, domain)

    async def list_domains(self, tenant: Tenant | str) -> tuple[Domain, ...]:
        """The tenant's domains, the primary first, read from the registry."""
        return await self.admin.list_domains(tenant)

    async def tenant_url(self, tenant: Tenant | str, path: str = "/", *, scheme: str = "https") -> str:
        """The URL of `path` on the tenant's primary domain, else on its subdomain of `domain_suffix`.

            return RedirectResponse(await manager.tenant_url(tenant, request.url.path))

        Read through the registry cache (no registry query once cached), so it is cheap
        enough for redirects on the request path. Raises `TenantNotFoundError` for an
        unknown tenant, `ConfigurationError` when it has no primary domain and there is
        no `domain_suffix`.
        """
        identifier = tenant.identifier if isinstance(tenant, Tenant) else tenant
        current = await self.lookup.get(identifier)
        if current is None or (isinstance(tenant, Tenant) and current.id != tenant.id):
            raise TenantNotFoundError(f"no tenant {identifier!r:.80}")
        domains = await self.lookup.domains_of(identifier)
        # Only this incarnation's: a list read before a purge and re-registration is no one's.
        mine = [domain for domain in domains if domain.tenant_id == current.id]
        return self.admin.domains.url(identifier, mine, path, scheme=scheme)
