"""`TenancyManager`: the parts' lifecycle and the request path; its tenant methods are `operations.py`'s."""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.requests import HTTPConnection

from ._utils import unavailable_as_503
from .admin import TenantAdmin
from .audit import AuditWriter
from .builder import build_parts
from .config import TenancyConfig
from .context import current_tenant
from .custom_domains import CustomDomains
from .errors import TenantInactiveError, TenantMaintenanceError, TenantNotFoundError, TenantResolutionError
from .events import LifecycleEvents
from .heap import freeze_startup_heap, release_startup_heap
from .invalidation.base import InvalidationChannel
from .invalidation.record import check_channel
from .isolation.base import Isolation
from .lookup import TenantLookup
from .maintenance import Maintenance
from .moves import TierMoves
from .operations import TenantOperations
from .provisioning import ProvisioningPipeline
from .ratelimit.base import RateLimiter
from .registration import Registration
from .resolution.base import Resolver, ResolverFunc
from .storage.base import TenantStore
from .tenant import Tenant, TenantStatus

if TYPE_CHECKING:  # optional extras: `cryptography`; Jinja2 (console); prometheus-client
    from .console import Console, OperatorAuth
    from .encryption import URLCipher
    from .metrics import TenantMetrics

__all__ = ["TenancyManager"]

_Session = TypeVar("_Session", bound=AsyncSession)


class TenancyManager(TenantOperations):
    """The composition root: one per application, shared by all its requests.

    Builds the resolver, the isolation strategy, the lookup cache and the
    database engine from `config`, and owns their lifecycles. It is also the
    only way to change tenants, so that every change invalidates the cache:
    its tenant methods (`register_tenant`, `update_tenant`, ...; `TenantOperations`)
    call its `admin`, a `TenantAdmin` over the same parts, or a service built on it.

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
        )
        # Your steps after a new tenant's storage exists (`@manager.provisioning.step`).
        self.provisioning = ProvisioningPipeline()
        self._registration = Registration(self.admin, self.provisioning, stamper=parts.stamper)
        self._maintenance = Maintenance(self.admin)
        self._moves = TierMoves(self.admin, self._maintenance, stamper=parts.stamper)
        self._domains = CustomDomains(self.admin, parts.domains)
        self._lifecycle_lock = asyncio.Lock()
        self._initialized = False
        self._froze_heap = False

    # -- lifecycle -----------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether `initialize()` has run (and `close()` not since): its pools may be open."""
        return self._initialized

    async def initialize(self) -> None:
        """Create the registry table and open the pool. Idempotent; call at startup.

        Ends by freezing the start-up heap (`gc.freeze()`, see `fastapi_tenancy.heap`) unless
        `gc_freeze` is off; `close()` gives it back.
        """
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
            if self.config.gc_freeze:
                # Last: what start-up made, the app's routes and models included (heap.py).
                freeze_startup_heap()
                self._froze_heap = True

    async def close(self) -> None:
        """Close every pool and forget cached tenants. Idempotent; call at shutdown."""
        async with self._lifecycle_lock:
            if self._froze_heap:
                # First, so that a part failing to close cannot keep the heap frozen.
                self._froze_heap = False
                release_startup_heap()
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
