"""Pins the SQLAlchemy and asyncpg internals that isolation/_begin.py builds on.

`_begin.py` sends each tenant transaction's setting in the `BEGIN` message by
subclassing `asyncpg.Connection` and swapping the dialect's execution context:
below SQLAlchemy's public surface. These tests fail loudly, naming what moved, when
an upgrade changes one of those hooks. Read against SQLAlchemy 2.0.30-2.1.x and
asyncpg 0.29-0.32; on a version outside those ranges the first test asks for the
hooks to be read again (and the ranges here and in _begin.py's docstring updated).
"""

import inspect

import pytest

asyncpg = pytest.importorskip("asyncpg")

import sqlalchemy  # noqa: E402
from asyncpg.transaction import Transaction  # noqa: E402
from sqlalchemy.dialects.postgresql import asyncpg as sa_asyncpg  # noqa: E402

from fastapi_tenancy.isolation import _begin  # noqa: E402

READ_SQLALCHEMY = ((2, 0), (2, 1))
READ_ASYNCPG = ((0, 29), (0, 32))


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_the_versions_are_those_the_hooks_were_read_against() -> None:
    low, high = READ_SQLALCHEMY
    assert low <= _minor(sqlalchemy.__version__) <= high, (
        f"SQLAlchemy {sqlalchemy.__version__}: re-read the asyncpg dialect's execution context and "
        "_start_transaction (see isolation/_begin.py), then widen READ_SQLALCHEMY"
    )
    low, high = READ_ASYNCPG
    assert low <= _minor(asyncpg.__version__) <= high, (
        f"asyncpg {asyncpg.__version__}: re-read Transaction.start and Connection.execute "
        "(see isolation/_begin.py), then widen READ_ASYNCPG"
    )


def test_sqlalchemy_begins_through_asyncpg_transactions() -> None:
    # The adapter begins lazily with connection.transaction(...).start(): that is the
    # BEGIN our connection class extends.
    source = inspect.getsource(sa_asyncpg.AsyncAdapt_asyncpg_connection._start_transaction)
    assert "self._connection.transaction(" in source
    assert ".start()" in source


def test_the_dialect_execution_context_is_the_one_we_subclass() -> None:
    assert sa_asyncpg.dialect.execution_ctx_cls is sa_asyncpg.PGExecutionContext_asyncpg
    assert issubclass(_begin.BeginSettingsContext, sa_asyncpg.PGExecutionContext_asyncpg)
    for hook in ("pre_exec", "handle_dbapi_exception"):
        assert callable(getattr(sa_asyncpg.PGExecutionContext_asyncpg, hook)), hook
    assert "_dbapi_connection" in inspect.getsource(sqlalchemy.engine.default.DefaultExecutionContext)


def test_asyncpg_sends_begin_through_connection_execute() -> None:
    source = inspect.getsource(Transaction.start)
    assert "self._connection.execute(query)" in source  # one simple-protocol message
    assert "_top_xact" in source  # the slot reset after a failed BEGIN message
    assert "_top_xact" in asyncpg.Connection.__slots__
    parameters = inspect.signature(asyncpg.Connection.execute).parameters
    assert list(parameters)[:3] == ["self", "query", "args"] and "timeout" in parameters


def test_asyncpg_ends_transactions_with_the_messages_the_reset_rides_in() -> None:
    # The connection reset is appended to exactly these two messages (savepoints differ).
    commit = inspect.getsource(Transaction._Transaction__commit)
    rollback = inspect.getsource(Transaction._Transaction__rollback)
    assert "query = 'COMMIT;'" in commit and "self._connection.execute(query)" in commit
    assert "query = 'ROLLBACK;'" in rollback and "self._connection.execute(query)" in rollback


def test_the_adapter_tracks_its_open_transaction_in_one_slot() -> None:
    # _begin.py reads it to see a transaction ended below SQLAlchemy.
    adapter = sa_asyncpg.AsyncAdapt_asyncpg_connection
    assert "self._transaction = transaction" in inspect.getsource(adapter._start_transaction)
    assert "adapt_connection._transaction is None" in inspect.getsource(sa_asyncpg.AsyncAdapt_asyncpg_cursor)


def test_asyncpg_counts_every_query_but_copy_and_copy_runs_through_the_methods_we_wrap() -> None:
    # _begin.py skips the reset in BEGIN while the protocol's count has not moved since the
    # last one; COPY is not counted, so the connection's COPY methods forget the reset.
    assert "queries_count" in dir(asyncpg.protocol.protocol.BaseProtocol)
    for copy in ("copy_from_table", "copy_from_query"):
        assert "self._copy_out(" in inspect.getsource(getattr(asyncpg.Connection, copy)), copy
    for copy in ("copy_to_table",):
        assert "self._copy_in(" in inspect.getsource(getattr(asyncpg.Connection, copy)), copy
    assert "self._protocol.copy_in(" in inspect.getsource(asyncpg.Connection.copy_records_to_table)
    for wrapped in ("_copy_out", "_copy_in", "copy_records_to_table"):
        assert wrapped in vars(_begin.BeginSettingsConnection), wrapped


def test_connection_execution_options_only_adds_hooks_to_the_union_tenant_sessions_keep() -> None:
    # isolation/base.py sets a tenant session's options on its connection by the union
    # alone: the event is for an application's options, and the dialect's hook handles
    # only its connection characteristics, none of which a tenant session sets.
    source = inspect.getsource(sqlalchemy.engine.Connection.execution_options)
    body = [line.strip() for line in source.split('"""')[-1].splitlines()]
    body = [line for line in body if line and not line.startswith("#")]
    assert body == [
        "if self._has_events or self.engine._has_events:",
        "self.dispatch.set_connection_execution_options(self, opt)",
        "self._execution_options = self._execution_options.union(opt)",
        "self.dialect.set_connection_execution_options(self, opt)",
        "return self",
    ], body
    from fastapi_tenancy.isolation import base

    characteristics = set(sa_asyncpg.dialect.connection_characteristics)
    assert not characteristics & {base.BEGIN_SETTING, base.ON_STATEMENT_TYPES_CHANGE, "schema_translate_map"}


def test_the_execution_context_reaches_the_asyncpg_connection_through_the_adapter() -> None:
    # BeginSettingsContext.pre_exec reads `fairy.dbapi_connection._connection`, what the
    # adapter's `driver_connection` returns through three properties.
    from sqlalchemy.connectors.asyncio import AsyncAdapt_dbapi_connection

    assert issubclass(sa_asyncpg.AsyncAdapt_asyncpg_connection, AsyncAdapt_dbapi_connection)
    assert "self._connection = connection" in inspect.getsource(AsyncAdapt_dbapi_connection.__init__)
    assert "return self._connection" in inspect.getsource(sqlalchemy.engine.interfaces.AdaptedConnection)


def test_a_pool_marks_older_connections_for_recycling_by_its_invalidate_time() -> None:
    # HandOffPool._do_get invalidates every connection older than a closed one as
    # Pool._invalidate does, by moving `_invalidate_time` past their `starttime`.
    assert "self._invalidate_time = time.time()" in inspect.getsource(sqlalchemy.pool.Pool._invalidate)
    assert "self.__pool._invalidate_time > self.starttime" in inspect.getsource(
        sqlalchemy.pool.base._ConnectionRecord.get_connection
    )
