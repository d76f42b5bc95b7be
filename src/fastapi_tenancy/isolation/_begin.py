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

A setting that fails is the tenant's error where it means one: the RLS tenant function's
`UNAVAILABLE_SQLSTATE` is a 503, and a tenant's storage marker that cannot be locked is a
404 or a 503 (`_incarnation.refusal`).

A tenant transaction also ends with the connection reset (`RESET_STATE`, in the
`COMMIT`/`ROLLBACK` message, so again no round trip of its own): whatever route code
set at session level (`SET search_path`, `set_config(..., false)`, `SET ROLE`, a
temporary table, a `WITH HOLD` cursor, an advisory lock) never reaches the next user of
the pooled connection. It begins with the reset too (in the `BEGIN` message) unless
nothing at all ran on the connection since its last reset, counted by the driver: what
code outside tenant sessions, or route code after its commit, left on it never reaches
a tenant, and a connection going from tenant to tenant pays for one reset, not two. Transaction control in
route SQL (`COMMIT`, `ROLLBACK`, ...) is refused before it runs (`TenantScopeError`):
it would end the transaction the tenant's setting lives in, and SQLAlchemy, still
believing it open, would send the next statements without a `BEGIN`.
"""

import contextlib
import re
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.dialects.postgresql.asyncpg import PGExecutionContext_asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import ConfigurationError, TenancyUnavailableError, TenantScopeError
from ._incarnation import refusal
from .base import BEGIN_SETTING, ON_STATEMENT_TYPES_CHANGE, UNAVAILABLE_SQLSTATE
from .roles import ROLE_SWITCH

__all__ = ["RESET_STATE", "BeginSettingsConnection", "BeginSettingsContext", "enable"]

RESET_STATE = (
    "RESET ALL; RESET SESSION AUTHORIZATION; DISCARD TEMP; DISCARD SEQUENCES; CLOSE ALL; "
    "UNLISTEN *; SELECT pg_advisory_unlock_all();"
)
"""Session state back to how the connection was opened (`DISCARD ALL` without
`DEALLOCATE ALL`, which would drop the driver's prepared statements, and usable inside
a transaction). `RESET ALL` keeps startup parameters (asyncpg's `server_settings`);
`RESET SESSION AUTHORIZATION` also resets `SET ROLE`; temporary tables go, which would
otherwise be found first by unqualified names in every later transaction."""

# Transaction control at the start of a statement, after blanks and comments.
# ROLLBACK TO [SAVEPOINT] stays inside the transaction and is allowed.
_ENDS_TRANSACTION = re.compile(
    r"(?:\s+|--[^\n]*|/\*.*?\*/)*"
    r"(?:COMMIT|END|ABORT|PREPARE\s+TRANSACTION|ROLLBACK(?!\s+(?:WORK\s+|TRANSACTION\s+)?TO\b))\b",
    re.IGNORECASE | re.DOTALL,
)


# With tenant roles (roles.py): statements that change the role, at the start of a
# statement, or set_config() of any setting not named by a plain literal other than the
# role's. Only what is visible in the statement's text: see docs/isolation.md.
_CHANGES_ROLE = re.compile(
    r"(?:\s+|--[^\n]*|/\*.*?\*/)*(?:"
    r"SET\s+(?:SESSION\s+|LOCAL\s+)?(?:ROLE(?!\w)|\"role\"|SESSION\s+AUTHORIZATION\b)"
    r"|RESET\s+(?:ROLE(?!\w)|\"role\"|SESSION\s+AUTHORIZATION\b|ALL\b)|DISCARD\s+ALL\b)",
    re.IGNORECASE | re.DOTALL,
)
_SETS_ROLE = re.compile(
    r"\bset_config\s*\((?!\s*'(?!role'|session_authorization')[A-Za-z0-9_.]+'\s*,)", re.IGNORECASE
)


class BeginSettingsConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """An asyncpg connection that sends a pending setting with its next `BEGIN`."""

    __slots__ = ("_reset_at", "begun_with", "pending")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: str | None = None
        """The setting for the transaction about to begin (set before each `BEGIN`)."""
        self.begun_with: str | None = None
        """The setting the current (or last) transaction began with."""
        self._reset_at: int | None = None
        # The protocol's count of queries right after this connection's last reset (None:
        # not reset since, or something ran that the count misses: COPY). Equal to the
        # count at the next BEGIN, nothing ran since the reset, so none is needed there.

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 (asyncpg's signature)
        # asyncpg's Transaction sends "BEGIN[ ISOLATION ...];", "COMMIT;" and "ROLLBACK;"
        # through here, each as one simple-protocol message: statements after BEGIN run
        # inside the new transaction, those after COMMIT or ROLLBACK right after it, on
        # the same server connection (behind PgBouncer too). Savepoints are
        # "SAVEPOINT ...", "RELEASE ..." and "ROLLBACK TO ...", and keep the transaction.
        if args:
            result: str = await super().execute(query, *args, timeout=timeout)
            return result
        if query.startswith("BEGIN"):
            # In this method, not a helper coroutine: one frame less on every transaction.
            setting, self.pending = self.pending, None
            self.begun_with = setting
            if setting is not None:
                # The reset here is for what ran on the connection since its last reset (code
                # outside tenant sessions, raw driver calls after a commit); nothing did, none
                # is sent: every statement, of SQLAlchemy or of the driver, simple or prepared,
                # counts in asyncpg's protocol (`queries_count`, what asyncpg's own pool reads),
                # and COPY, which does not count, forgets the reset (below).
                clean = self._reset_at is not None and self._reset_at == self._protocol.queries_count
                self._reset_at = None
                query = f"{query} {setting}" if clean else f"{query} {RESET_STATE} {setting}"
                try:
                    result = await super().execute(query, timeout=timeout)
                except Exception as exc:
                    translated = await self._begin_failed(exc, setting)
                    if translated is None:
                        raise
                    raise translated from exc
                return result
        elif self.begun_with is not None and query in ("COMMIT;", "ROLLBACK;"):
            # The end of a tenant's transaction: reset what its statements set.
            self.begun_with = self._reset_at = None
            result = await super().execute(f"{query} {RESET_STATE}", timeout=timeout)
            self._reset_at = self._protocol.queries_count
            return result
        result = await super().execute(query, timeout=timeout)
        return result

    async def _begin_failed(self, exc: Exception, setting: str) -> Exception | None:
        """Clean up after a `BEGIN` whose setting failed; the error to raise instead, or None."""
        # BEGIN ran but the setting failed: the transaction is open and aborted, and
        # the caller, seeing BEGIN fail, will never roll it back.
        self.begun_with = None
        if not self.is_closed() and self.is_in_transaction():
            with contextlib.suppress(Exception):  # a broken connection: the error above says why
                await super().execute("ROLLBACK;")
        # asyncpg keeps a transaction whose start failed as the connection's current
        # one, so its next transaction() would send SAVEPOINT instead of BEGIN.
        self._top_xact = None  # type: ignore[misc]  # asyncpg's own slot
        if getattr(exc, "sqlstate", None) == UNAVAILABLE_SQLSTATE:
            return TenancyUnavailableError(str(getattr(exc, "message", exc)))
        # The tenant's storage is gone, or is another incarnation's (_incarnation.py).
        return refusal(exc, setting)

    # COPY runs a statement without counting it as a query (asyncpg's protocol): a
    # `COPY (SELECT ...) TO STDOUT` may change session state like any SELECT.
    async def _copy_out(self, *args: Any, **kwargs: Any) -> Any:
        self._reset_at = None
        return await super()._copy_out(*args, **kwargs)

    async def _copy_in(self, *args: Any, **kwargs: Any) -> Any:
        self._reset_at = None
        return await super()._copy_in(*args, **kwargs)

    async def copy_records_to_table(self, *args: Any, **kwargs: Any) -> Any:
        self._reset_at = None
        return await super().copy_records_to_table(*args, **kwargs)


class BeginSettingsContext(PGExecutionContext_asyncpg):
    """The asyncpg execution context, handing each new transaction its setting."""

    def pre_exec(self) -> None:
        super().pre_exec()  # type: ignore[no-untyped-call]
        setting = self.execution_options.get(BEGIN_SETTING)
        # The pooled connection's adapter and the asyncpg connection in it, by attribute (its
        # `driver_connection` goes through three properties, on every statement).
        adapted: Any = self._dbapi_connection.dbapi_connection
        raw: Any = adapted._connection
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
        if setting is None:
            if not raw.is_in_transaction():
                raw.pending = None
            return
        if _ENDS_TRANSACTION.match(self.statement):
            raise TenantScopeError(
                "transaction control in a tenant session is refused: it would end the "
                f"transaction the tenant's setting lives in ({self.statement[:40]!r}); use the "
                "session's commit() or rollback()"
            )
        if ROLE_SWITCH in setting and (
            _CHANGES_ROLE.match(self.statement) or _SETS_ROLE.search(self.statement)
        ):
            # The login role may become any tenant's role: a route must not pick one.
            raise TenantScopeError(
                "changing the role in a tenant session is refused: the transaction runs as the "
                f"tenant's role ({self.statement[:40]!r})"
            )
        if not raw.is_in_transaction():
            if adapted._transaction is not None:
                # SQLAlchemy believes its transaction open, so it will send no BEGIN:
                # something below it (the raw driver) ended the transaction.
                raise TenantScopeError(
                    "the tenant's transaction was ended outside SQLAlchemy; roll the session back"
                )
            if self.execution_options.get("isolation_level") == "AUTOCOMMIT":
                # Outside a transaction there is no BEGIN to carry the setting.
                raise ConfigurationError("AUTOCOMMIT is not supported in tenant sessions")
            raw.pending = setting  # the adapter sends BEGIN next, right before this statement
        elif raw.begun_with != setting:
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
