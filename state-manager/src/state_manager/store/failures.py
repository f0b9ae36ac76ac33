"""Database failures, whichever backend raised them, mapped in one place.

* :func:`is_transient`: the database aborted a transaction that may simply be run
  again (PostgreSQL deadlock or serialisation failure, SQLite busy, a MongoDB error
  labelled ``TransientTransactionError`` such as a write conflict).
* :func:`unavailable`: the database cannot serve now (unreachable, restarting, disk
  full, no primary); answered 503 with :class:`DatabaseUnavailable`.
"""

from __future__ import annotations

import sqlite3

from pymongo import errors as mongo_errors
from sqlalchemy.exc import DBAPIError

from state_manager.errors import DatabaseUnavailable

# PostgreSQL aborts one of two transactions that deadlock (40P01) or cannot be
# serialised (40001); running it again is the documented remedy.
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
# A server shutting down (57P01, 57P02) or starting up (57P03); class 08 is a
# connection failure.
UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
# How often a transaction aborted for a transient reason is run again. MongoDB reports
# a conflict at once instead of waiting for the other writer (as a row lock does), so
# under contention it needs more attempts, each after a short random pause.
SQL_TRANSIENT_ATTEMPTS = 5
MONGO_TRANSIENT_ATTEMPTS = 40
# MongoDB error codes that mean the server cannot serve now (not primary, shutting
# down, out of disk).
MONGO_UNAVAILABLE_CODES = frozenset(
    {
        91,  # ShutdownInProgress
        189,  # PrimarySteppedDown
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
        14031,  # OutOfDiskSpace
    }
)
DISK_FULL = (
    "The database's disk is full, so nothing was written. "
    "Writes resume by themselves once space is freed."
)
UNREACHABLE = (
    "The database is unreachable or restarting; retry the request. "
    "A write cut off while it was committing may have been applied."
)


def is_transient(error: BaseException) -> bool:
    """Whether the database aborted a transaction that may simply be run again."""
    if isinstance(error, mongo_errors.PyMongoError):
        return error.has_error_label("TransientTransactionError")
    if not isinstance(error, DBAPIError):
        return False
    original = error.orig
    code = getattr(original, "pgcode", None) or getattr(original, "sqlstate", None)
    return code in TRANSIENT_SQLSTATES or "database is locked" in str(original)


def transient_attempts(error: BaseException) -> int:
    """How many attempts in all a transaction aborted by ``error`` deserves."""
    if isinstance(error, mongo_errors.PyMongoError):
        return MONGO_TRANSIENT_ATTEMPTS
    return SQL_TRANSIENT_ATTEMPTS


def unavailable(error: BaseException) -> DatabaseUnavailable | None:
    """The error to answer (503) when ``error`` says the database cannot serve now: its
    disk is full, or the connection was refused, lost, or the server is restarting.
    ``None`` for any other error (a bug, answered 500)."""
    if isinstance(error, OSError):  # refused, reset or timed out while connecting
        return DatabaseUnavailable(UNREACHABLE)
    if isinstance(error, mongo_errors.PyMongoError):
        return _mongo_unavailable(error)
    if not isinstance(error, DBAPIError):
        return None
    original = error.orig
    if getattr(original, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return DatabaseUnavailable(DISK_FULL)
    code = str(getattr(original, "pgcode", None) or getattr(original, "sqlstate", None) or "")
    if error.connection_invalidated or code.startswith("08") or code in UNAVAILABLE_SQLSTATES:
        return DatabaseUnavailable(UNREACHABLE)
    return None


def _mongo_unavailable(error: mongo_errors.PyMongoError) -> DatabaseUnavailable | None:
    if isinstance(error, mongo_errors.ConnectionFailure | mongo_errors.ServerSelectionTimeoutError):
        return DatabaseUnavailable(UNREACHABLE)
    code = getattr(error, "code", None)
    if code == 14031:
        return DatabaseUnavailable(DISK_FULL)
    if code in MONGO_UNAVAILABLE_CODES or error.has_error_label("RetryableWriteError"):
        return DatabaseUnavailable(UNREACHABLE)
    return None


# The exception types a request handler maps with :func:`unavailable`.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    DBAPIError,
    OSError,
    mongo_errors.PyMongoError,
)
