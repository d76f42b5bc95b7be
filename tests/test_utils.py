"""`is_outage`: which drivers' errors mean "the database is unreachable" (a 503), and which stay errors."""

import errno
import socket
import sqlite3

import asyncpg
import pymysql
import pytest
from sqlalchemy import exc as sa_exc

from fastapi_tenancy._utils import is_outage


def _wrapped(orig: Exception, base: type[Exception], *, invalidated: bool = False) -> sa_exc.DBAPIError:
    """`orig` as SQLAlchemy hands it on (`OperationalError` for pymysql's `OperationalError`...)."""
    error = sa_exc.DBAPIError.instance("SELECT 1", {}, orig, base, connection_invalidated=invalidated)
    assert isinstance(error, sa_exc.DBAPIError)
    return error


def _mysql(kind: type[pymysql.err.Error], code: int, message: str, **flags: bool) -> sa_exc.DBAPIError:
    return _wrapped(kind(code, message), pymysql.err.Error, **flags)


OUTAGES = {
    "mysql-connect-refused": _mysql(
        pymysql.err.OperationalError, 2003, "Can't connect to MySQL server on '127.0.0.1'"
    ),
    "mysql-socket-connect": _mysql(pymysql.err.OperationalError, 2002, "Can't connect to local server"),
    "mysql-too-many-connections": _mysql(pymysql.err.OperationalError, 1040, "Too many connections"),
    "mysql-user-connections": _mysql(pymysql.err.OperationalError, 1203, "User root has exceeded ..."),
    "mysql-server-shutdown": _mysql(pymysql.err.OperationalError, 1053, "Server shutdown in progress"),
    # SQLAlchemy's own is_disconnect decides these (2006, 2013, 2055...): it sets the flag.
    "mysql-lost-connection": _mysql(
        pymysql.err.OperationalError, 2013, "Lost connection to server during query", invalidated=True
    ),
    "postgres-starting-up": _wrapped(
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), Exception
    ),
    "postgres-too-many": _wrapped(asyncpg.exceptions.TooManyConnectionsError("sorry, too many"), Exception),
    "connect-refused": ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"),
    "every-address-refused": OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 5432, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 5432)"
    ),
    "host-unreachable": OSError(errno.EHOSTUNREACH, "No route to host"),
    "unknown-host": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    "connect-timeout": TimeoutError(),
    "pool-timeout": sa_exc.TimeoutError("QueuePool limit of size 1 overflow 0 reached"),
}

STATEMENT_ERRORS = {
    "mysql-syntax": _mysql(pymysql.err.ProgrammingError, 1064, "You have an error in your SQL syntax"),
    "mysql-no-table": _mysql(pymysql.err.ProgrammingError, 1146, "Table 'test.nope' doesn't exist"),
    "mysql-lock-wait": _mysql(pymysql.err.OperationalError, 1205, "Lock wait timeout exceeded"),
    "mysql-duplicate": _mysql(pymysql.err.IntegrityError, 1062, "Duplicate entry '1' for key 'PRIMARY'"),
    "sqlite-no-table": _wrapped(sqlite3.OperationalError("no such table: orders"), sqlite3.Error),
    "sqlite-locked": _wrapped(sqlite3.OperationalError("database is locked"), sqlite3.Error),
    # A number that happens to be an outage code, from a driver that is not MySQL's.
    "sqlite-numbered": _wrapped(sqlite3.OperationalError(2003, "not a MySQL error"), sqlite3.Error),
    "postgres-undefined-table": _wrapped(
        asyncpg.exceptions.UndefinedTableError('relation "orders" does not exist'), Exception
    ),
    "missing-file": FileNotFoundError(errno.ENOENT, "No such file or directory"),
    "value-error": ValueError("bad"),
}


@pytest.mark.parametrize("error", list(OUTAGES.values()), ids=list(OUTAGES))
def test_connection_errors_of_every_driver_are_outages(error: BaseException) -> None:
    assert is_outage(error)


@pytest.mark.parametrize("error", list(STATEMENT_ERRORS.values()), ids=list(STATEMENT_ERRORS))
def test_a_statement_error_stays_a_statement_error(error: BaseException) -> None:
    assert not is_outage(error)
