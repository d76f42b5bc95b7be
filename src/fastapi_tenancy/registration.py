"""`Registration`: a new tenant, from its registry row to `active`, or undone whole.

The tenant is `provisioning` while its storage is made, stamped at the head revision
(with `alembic_config`) and the application's `ProvisioningPipeline` steps run; any
failure removes the storage and the registry row, so that no half-made tenant is left.
Applications reach it through `TenancyManager.register_tenant` and `seed_tenant`.
"""

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .admin import TenantAdmin
from .audit import SQLAuditWriter
from .cloning import clone_tenant
from .errors import (
    ConfigurationError,
    ProvisioningError,
    TenancyError,
    TenancyUnavailableError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantInactiveError,
)
from .events import LifecycleEvent, TenantEvent
from .provisioning import ProvisioningJob, ProvisioningPipeline
from .storage.database import SQLAlchemyTenantStore
from .tenant import Tenant, TenantStatus
from .urls import normalise_database_url

if TYPE_CHECKING:  # Alembic, the migrations extra
    from .migrations.stamp import Stamper

__all__ = ["Registration"]

logger = logging.getLogger("fastapi_tenancy")


class Registration:
    """Registers and seeds tenants over one `TenantAdmin`; safe to share between tasks.

    Background registrations run in `provisioning`'s jobs, in this process.
    """

    def __init__(
        self, admin: TenantAdmin, provisioning: ProvisioningPipeline, *, stamper: "Stamper | None" = None
    ) -> None:
        self.admin = admin
        self.provisioning = provisioning
        # Set when migrations are configured (alembic_config): new tenants start at head.
        self.stamper = stamper

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
        """Register a tenant, create its storage and the `app_metadata` tables in it.

        `database_url` (database isolation) puts the tenant's database on another
        server: it is encrypted with `encryption_keys` before it is stored, and only
        the ciphertext is kept on the returned `Tenant`. With hybrid isolation the
        tenant goes to `tier`, or to the tier of its metadata's `plan`
        (`hybrid_plan_tiers`), or to `hybrid_default_tier`; the choice is stored with it.

        The tenant is `provisioning` until its storage is ready and the steps of
        `provisioning` (the `ProvisioningPipeline`: seed data, a first user, ...) have
        run, then `active`. If any of that fails, the registration is undone and
        `ProvisioningError` raised: no half-made tenant is left. Raises
        `InvalidIdentifierError` for a slug that cannot be stored and
        `TenantAlreadyExistsError` for a taken one (a soft-deleted tenant keeps its slug
        until purged).

        `background=True` returns as soon as the tenant is registered, still
        `provisioning`, and queues the rest in this process (`provisioning.job(identifier)`
        follows it); a failure then undoes the registration as well, and is logged.

        With `alembic_config` set, provisioning ends at the head revision: storage made
        from `app_metadata` is stamped at head, storage with no tables is migrated to
        head, and a revision the storage already has (a clone of the template) is kept
        (see `fastapi_tenancy.migrations.stamp`).
        """
        admin = self.admin
        admin.isolation.storage_name(identifier)  # validates before anything is written
        tier = admin.isolation.choose_tier(tier, metadata or {})
        new = Tenant(
            identifier=identifier,
            name=name,
            metadata=metadata or {},
            status=TenantStatus.PROVISIONING,
            encrypted_database_url=None if database_url is None else self._encrypt(database_url),
            tier=tier,
        )
        admin.isolation.check(new)
        registered = admin.events.new_event(LifecycleEvent.REGISTERED, new)
        try:
            tenant, audited = await self._insert(new, registered, background=background)
        except TenantAlreadyExistsError as exc:
            holder = await admin.store.get_by_identifier(identifier)
            if holder is not None and holder.status is TenantStatus.DELETED:
                raise TenantAlreadyExistsError(
                    f"{identifier!r} belongs to a deleted tenant whose data is kept; purge it first "
                    "with delete_tenant(..., destroy_data=True)"
                ) from exc
            raise
        # This process forgets a cached miss now; the other workers learn of the tenant once
        # it is active (one publish, at the end), unless the caller gets it back while still
        # `provisioning` (background), when they are told now as well.
        admin.lookup.invalidate(identifier)
        if background:
            await admin.announce(identifier)
        await admin.events.deliver(registered, audited=audited)
        if background:
            self.provisioning.start(identifier, lambda job: self._complete(tenant, app_metadata, job))
            return tenant
        return await self._complete(tenant, app_metadata)

    async def _insert(self, new: Tenant, registered: TenantEvent, *, background: bool) -> tuple[Tenant, bool]:
        """Store `new`, with its `registered` entry in one transaction where it can: (tenant, audited)."""
        registry, audit = self._registry(), self._audit_in_registry()
        if registry is None:
            return await self.admin.store.create(new), False
        also: list[sa.Executable] = [] if audit is None else [audit.insert(registered)]
        if not background and registry.engine.dialect.name == "postgresql":
            # The row reserves the slug; it is made durable by the activation's commit in
            # this database (the write-ahead log is flushed in order), or removed if the
            # registration fails: this commit need not wait for the disk.
            also.append(_NO_FLUSH)
        try:
            return await registry.create(new, also=also), audit is not None
        except (TenantAlreadyExistsError, TenancyUnavailableError):
            raise
        except sa_exc.SQLAlchemyError:
            if audit is None:
                raise
            # An audit entry that cannot be written never fails a change (LifecycleEvents.emit):
            # the row alone, and the entry written the usual way, its failure logged.
            return await registry.create(new), False

    def _registry(self) -> SQLAlchemyTenantStore | None:
        """The registry, when it takes other statements into its transactions (`also=`)."""
        store = self.admin.store
        # Not behind a cache (CachingTenantStore), which must see each write itself.
        return store if isinstance(store, SQLAlchemyTenantStore) else None

    def _audit_in_registry(self) -> SQLAuditWriter | None:
        """The audit log, when its entries can commit in the registry's own transactions."""
        audit, registry = self.admin.events.audit, self._registry()
        if not isinstance(audit, SQLAuditWriter) or registry is None:
            return None
        # A subclass that writes entries its own way keeps doing so.
        same = audit.engine is registry.engine and type(audit).write is SQLAuditWriter.write
        return audit if same else None

    async def _activate(self, tenant: Tenant) -> Tenant:
        """`provisioning` -> `active` in one registry transaction with its audit entry and publish.

        Compare-and-set against the row this registration wrote, so no read comes first;
        any change since (a delete during provisioning, which wins) takes the general path.
        """
        admin, identifier = self.admin, tenant.identifier
        audit, registry = self._audit_in_registry(), self._registry()
        if audit is None or registry is None:
            return await admin.change(identifier, lambda t: t.with_status(TenantStatus.ACTIVE))
        after = tenant.with_status(TenantStatus.ACTIVE)
        record = admin.events.change_event(tenant, after)
        channel = admin.invalidation
        notice = None if channel is None else channel.notice(registry.engine, identifier)
        also = [audit.insert(record)] if notice is None else [audit.insert(record), notice]
        try:
            active = await registry.update(after, expected=tenant, also=also)
        except (TenantChangedError, sa_exc.SQLAlchemyError):
            # Changed since (a delete wins), or an entry that cannot be written (which must not
            # fail the change): the general path, with the entry in a transaction of its own.
            return await admin.change(identifier, lambda t: t.with_status(TenantStatus.ACTIVE))
        except BaseException:
            await admin.announce(identifier)  # whatever the outcome, as `TenantAdmin.change`
            raise
        if notice is None:
            await admin.announce(identifier)
        else:  # the other workers were told by the commit itself
            admin.lookup.invalidate(identifier)
        await admin.events.deliver(replace(record, tenant=active), audited=True)
        return active

    async def _complete(
        self, tenant: Tenant, app_metadata: sa.MetaData | None, job: ProvisioningJob | None = None
    ) -> Tenant:
        """The rest of a registration: storage, version stamp, steps, then `active`; undone on failure."""
        identifier = tenant.identifier
        try:
            await self._provision(tenant, app_metadata, job)
        except BaseException as exc:
            await self.undo(tenant, exc, job)
            if isinstance(exc, TenancyError | asyncio.CancelledError) or not isinstance(exc, Exception):
                raise
            raise ProvisioningError(f"could not provision tenant {identifier!r}: {exc}") from exc
        # A delete that landed during provisioning wins: deleted -> active is refused.
        active = await self._activate(tenant)
        logger.info("registered tenant %s", identifier)
        return active

    async def _provision(
        self, tenant: Tenant, app_metadata: sa.MetaData | None, job: ProvisioningJob | None = None
    ) -> None:
        isolation = self.admin.isolation
        await isolation.provision(tenant, app_metadata)
        try:
            if self.stamper is not None:
                outcome = await self.stamper.after_provision(isolation, tenant)
                logger.info("tenant %s: version table %s", tenant.identifier, _OUTCOMES[outcome])
            if self.provisioning.steps:
                await self.provisioning.run(tenant, isolation, job=job)
        except BaseException:
            # The storage made above goes too, so that the slug can be registered again.
            await asyncio.shield(self.destroy_quietly(tenant))
            raise

    async def seed_tenant(self, tenant: Tenant | str, *, steps: Iterable[str] | None = None) -> list[str]:
        """Run the provisioning steps (all, or those named in `steps`) for an existing tenant.

        For a tenant registered before a step was added, or to seed one again (write
        steps so that a second run does no harm). Runs in the tenant's scope, as at
        registration, for a tenant that is active, in maintenance or suspended; a failing
        step raises `ProvisioningError` after the `undo` of the steps before it, and the
        tenant stays as it is. Returns the names of the steps that ran; audited as `seeded`.
        """
        chosen = self.provisioning.select(steps)
        if not chosen:
            raise ConfigurationError(
                "no provisioning steps to run: add them to manager.provisioning (with the CLI, name "
                "the application's manager with --app module:attribute)"
            )
        current = await self.admin.current(tenant)
        if current.status not in (TenantStatus.ACTIVE, TenantStatus.MAINTENANCE, TenantStatus.SUSPENDED):
            raise TenantInactiveError(current.status.value)
        ran = await self.provisioning.run(current, self.admin.isolation, steps=chosen)
        await self.admin.events.emit(LifecycleEvent.SEEDED, current, steps=ran)
        logger.info("seeded tenant %s: %s", current.identifier, ", ".join(ran))
        return ran

    async def clone_tenant(
        self,
        source: Tenant | str,
        identifier: str,
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        app_metadata: sa.MetaData | None = None,
    ) -> Tenant:
        """Register `identifier` with a consistent copy of `source`'s data; then active.

        See `cloning.clone_tenant`: the source keeps serving; a failure undoes the clone.
        """
        return await clone_tenant(
            self, source, identifier, name=name, metadata=metadata, app_metadata=app_metadata
        )

    async def destroy_quietly(self, tenant: Tenant) -> None:
        """Remove the storage of a tenant whose registration failed; log (never raise) a failure."""
        try:
            await self.admin.isolation.destroy(tenant)
        except Exception:  # the original error matters more; say what is left behind
            logger.exception("could not remove the storage of failed tenant %s", tenant.identifier)

    def _encrypt(self, database_url: str) -> str:
        cipher = self.admin.cipher
        if cipher is None:
            raise ConfigurationError(
                "a tenant's database_url is encrypted at rest: set encryption_keys "
                "(TENANCY_ENCRYPTION_KEYS) to register one"
            )
        try:
            normalised = normalise_database_url(database_url)
        except ValueError as exc:  # the message names the problem, never the URL
            raise ConfigurationError(f"database_url: {exc}") from None
        return cipher.encrypt(normalised)

    async def undo(self, tenant: Tenant, error: BaseException, job: ProvisioningJob | None = None) -> None:
        """Remove the registry row of a tenant whose registration failed (`error`), audited, told."""
        details = {"reason": "provisioning failed", "error": type(error).__name__}
        if job is not None and job.step is not None:
            details["step"] = job.step
        if job is not None:
            # Nobody awaits a background registration: its failure is told here.
            logger.error(
                "background registration of tenant %s failed and was undone: %s", tenant.identifier, error
            )
        try:
            await self.admin.store.delete(tenant.id)
            await self.admin.events.emit(LifecycleEvent.PURGED, tenant, **details)
        except Exception:  # the original error matters more; say what is left behind
            logger.exception("could not remove the registry row of failed tenant %s", tenant.identifier)
        finally:
            await self.admin.announce(tenant.identifier)


_NO_FLUSH = sa.text("SET LOCAL synchronous_commit TO off")

_OUTCOMES = {"kept": "kept as provisioned", "stamped": "stamped at head", "migrated": "migrated to head"}
