"""Sessions that fill the tenant column: RLS sessions, and hybrid isolation's in its other tiers.

Every new ORM object of such a session gets the tenant's id in the tenant column before
the flush, so one model (with the column) serves shared tables and a tenant's own schema
or database alike. Private to `isolation/`.
"""

import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Mapper, Session, UOWTransaction

from .base import CONNECTION_OPTIONS, TenantSession, new_session

__all__ = ["tenant_session"]

_TENANT_ID = "fastapi_tenancy.tenant_id"  # Session.info: the id the tenant column is filled with


class _TenantRowSession(TenantSession):
    """The sync side of tenant sessions: a class of our own only to scope one flush listener."""


# Mapper -> attribute key of its tenant column (None: the mapper has none). Cached per mapper.
_TENANT_KEYS: "weakref.WeakKeyDictionary[Mapper[Any], dict[str, str | None]]" = weakref.WeakKeyDictionary()


def _tenant_key(mapper: Mapper[Any], column: str) -> str | None:
    keys = _TENANT_KEYS.setdefault(mapper, {})
    if column not in keys:
        key = None
        for table in mapper.tables:
            if column in table.c:
                key = mapper.get_property_by_column(table.c[column]).key
                break
        keys[column] = key
    return keys[column]


def _fill_tenant_column(session: Session, _context: UOWTransaction, _instances: object) -> None:
    # Before the flush: the ORM then knows the full primary key without a round trip.
    # A value naming another tenant is left alone: the policy's WITH CHECK refuses it.
    column, tenant_id = session.info[_TENANT_ID]
    for instance in session.new:
        key = _tenant_key(sa.inspect(instance).mapper, column)
        if key is not None and getattr(instance, key) is None:
            setattr(instance, key, tenant_id)


event.listen(_TenantRowSession, "before_flush", _fill_tenant_column)


def tenant_session(
    bind: AsyncEngine,
    column: str,
    tenant_id: str,
    options: dict[str, Any] | None = None,
    *,
    session_class: type[AsyncSession] = AsyncSession,
) -> AsyncSession:
    """A new session on `bind` that fills `column` with `tenant_id` in every new ORM object.

    What RLS sessions are; hybrid isolation makes its other tiers' sessions the same
    way, so one model (with the tenant column) serves every tier. `options`: the
    execution options of each connection it begins on (see `TenantSession`); `session_class`:
    the class of the session (see `Isolation.session()`).
    """
    return new_session(
        session_class,
        _TenantRowSession,
        bind=bind,
        expire_on_commit=False,
        info={_TENANT_ID: (column, tenant_id), CONNECTION_OPTIONS: options},
    )
