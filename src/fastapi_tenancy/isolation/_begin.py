"""Transaction-local settings sent in the same message as `BEGIN` (PostgreSQL, asyncpg).

A tenant's transaction needs its setting (the schema's `search_path`) before its
first statement. Sent as a statement of its own, that costs a round trip per
transaction; here it rides in the `BEGIN` message the driver sends anyway
(`BEGIN; SET LOCAL search_path TO "tenant_acme";`, one simple-protocol message),
so a tenant request costs the same round trips as a request without tenancy.

Two parts, installed together by `enable()` on the engine tenant sessions run on:

- `BeginSettingsConnection`, the asyncpg connection class (asyncpg's documented
  `connection_class`), appends the pending setting to the next `BEGIN`;
- `BeginSettingsContext`, the dialect's execution context, which runs before every
  statement: when the statement is about to open a transaction it hands the
  connection that transaction's setting (the `BEGIN_SETTING` execution option
  its tenant session gave the connection, or none), and inside a transaction it refuses a statement whose
  setting is not the one the transaction began with. No engine event listener is
  involved: listeners put every statement of an engine on SQLAlchemy's slower
  event-dispatching path.

Below SQLAlchemy's public surface, read against SQLAlchemy 2.0.30-2.1.x and asyncpg
0.29-0.32 (`AsyncAdapt_asyncpg_connection._start_transaction`, asyncpg's
`Transaction.start` and `Connection._top_xact`); tests/isolation/test_begin_internals.py
pins each hook and fails, naming it, on an upgrade that moves one.

Every `BEGIN` is preceded by the statement that caused it (SQLAlchemy's asyncpg
adapter begins lazily, right before the first statement), so a setting is never
left over for another transaction: each statement overwrites it, a `BEGIN`
consumes it.
"""

import contextlib
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.dialects.postgresql.asyncpg import PGExecutionContext_asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import ConfigurationError, TenancyUnavailableError
from .base import BEGIN_SETTING, ON_STATEMENT_TYPES_CHANGE, UNAVAILABLE_SQLSTATE

__all__ = ["BeginSettingsConnection", "BeginSettingsContext", "enable"]


class BeginSettingsConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """An asyncpg connection that sends a pending setting with its next `BEGIN`."""

    __slots__ = ("begun_with", "pending")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: str | None = None
        """The setting for the transaction about to begin (set before each `BEGIN`)."""
        self.begun_with: str | None = None
        """The setting the current (or last) transaction began with."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 (asyncpg's signature)
        # asyncpg's Transaction.start() sends "BEGIN[ ISOLATION ...];" through here, as
        # one simple-protocol message: a second statement in it runs inside the new
        # transaction. Savepoints are "SAVEPOINT ..." and keep the transaction's setting.
        if args or not query.startswith("BEGIN"):
            result: str = await super().execute(query, *args, timeout=timeout)
            return result
        setting, self.pending = self.pending, None
        self.begun_with = setting
        if setting is None:
            result = await super().execute(query, timeout=timeout)
            return result
        try:
            result = await super().execute(f"{query} {setting}", timeout=timeout)
        except Exception as exc:
            # BEGIN ran but the setting failed: the transaction is open and aborted, and
            # the caller, seeing BEGIN fail, will never roll it back.
            if not self.is_closed() and self.is_in_transaction():
                with contextlib.suppress(Exception):  # a broken connection: the error above says why
                    await super().execute("ROLLBACK;")
            # asyncpg keeps a transaction whose start failed as the connection's current
            # one, so its next transaction() would send SAVEPOINT instead of BEGIN.
            self._top_xact = None  # type: ignore[misc]  # asyncpg's own slot
            if getattr(exc, "sqlstate", None) == UNAVAILABLE_SQLSTATE:
                raise TenancyUnavailableError(str(getattr(exc, "message", exc))) from exc
            raise
        return result


class BeginSettingsContext(PGExecutionContext_asyncpg):
    """The asyncpg execution context, handing each new transaction its setting."""

    def pre_exec(self) -> None:
        super().pre_exec()  # type: ignore[no-untyped-call]
        setting = self.execution_options.get(BEGIN_SETTING)
        raw: Any = self._dbapi_connection.driver_connection
        # Not isinstance(): asyncpg's metaclass makes every asyncpg connection pass it.
        if BeginSettingsConnection not in type(raw).__mro__:
            if setting is not None:
                # Opened before enable(), or with a connection_class of the application's.
                raise ConfigurationError(
                    "this connection cannot carry the tenant's setting: tenant sessions need "
                    "connections opened after the isolation was set up, with asyncpg's "
                    "connection_class left to fastapi-tenancy (or a subclass of BeginSettingsConnection)"
                )
            return
        if not raw.is_in_transaction():
            if setting is not None and self.execution_options.get("isolation_level") == "AUTOCOMMIT":
                # Outside a transaction there is no BEGIN to carry the setting.
                raise ConfigurationError("AUTOCOMMIT is not supported in tenant sessions")
            raw.pending = setting  # the adapter sends BEGIN next, right before this statement
        elif setting is not None and raw.begun_with != setting:
            # A transaction begun for someone else (or for no tenant), joined by a
            # tenant's bind: its statements would run under the wrong setting.
            raise ConfigurationError(
                "a tenant statement ran in a transaction that was not begun for that tenant; "
                "use one tenant session per transaction"
            )

    def handle_dbapi_exception(self, e: BaseException) -> None:
        super().handle_dbapi_exception(e)  # type: ignore[no-untyped-call]
        # SQLAlchemy's adapted errors: a cached statement whose result type changed, or
        # whose parameter types (fixed when first prepared) no longer fit ("cannot cast
        # type tenant_a.mood to mood", "operator does not exist").
        if (
            type(e).__name__ == "InvalidCachedStatementError"
            or getattr(e, "sqlstate", None) in _TYPE_MISMATCH
        ):
            hook = self.execution_options.get(ON_STATEMENT_TYPES_CHANGE)
            if hook is not None:
                hook(e)


_TYPE_MISMATCH = ("42846", "42883")  # cannot_coerce, undefined_function (operators too)


def enable(engine: AsyncEngine) -> None:
    """Make `engine` send each transaction's `BEGIN_SETTING` with its `BEGIN`. Idempotent.

    Changes this engine only: its dialect's execution context, and the connection
    class of the connections it opens from now on (a `do_connect` hook, which runs
    once per new connection and leaves statements on SQLAlchemy's fast path).
    Connections it opened before are refused to tenant binds, never used without
    the setting.
    """
    sync_engine = engine.sync_engine
    if issubclass(sync_engine.dialect.execution_ctx_cls, BeginSettingsContext):
        return
    event.listen(sync_engine, "do_connect", _use_connection_class)
    sync_engine.dialect.execution_ctx_cls = BeginSettingsContext


def _use_connection_class(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
    cparams.setdefault("connection_class", BeginSettingsConnection)
