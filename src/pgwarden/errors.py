"""The errors pgwarden raises.

Every error derives from `PgwardenError`. The pool's runtime errors also derive
from `psycopg.OperationalError`, so code that already handles the driver's
errors keeps working. No message ever contains a password.
"""

from __future__ import annotations

import psycopg


class PgwardenError(Exception):
    """Base class of every error raised by pgwarden."""

    __module__ = "pgwarden"


class ConfigError(PgwardenError, ValueError):
    """A setting has a value that pgwarden cannot use.

    Raised when a `PoolConfig` (or a pool) is built, never at first use. The
    message names the setting or environment variable, the value given and what
    is allowed.
    """

    __module__ = "pgwarden"


class UnknownLane(PgwardenError, ValueError):
    """A connection was asked for on a lane the pool does not have."""

    __module__ = "pgwarden"


class PoolError(PgwardenError, psycopg.OperationalError):
    """Base class of the errors a pool raises while serving connections."""

    __module__ = "pgwarden"


class PoolTimeout(PoolError):
    """No connection could be handed out before the caller's deadline.

    The message says how many connections are in use, how many callers wait,
    which connections have been held longest and where they were acquired, and
    the last connection error if the server could not be reached.
    `last_error` holds that error's text (or None).
    """

    __module__ = "pgwarden"

    last_error: str | None = None


class PoolOverloaded(PoolError):
    """`max_waiting` callers already wait: the request is refused at once."""

    __module__ = "pgwarden"


class PoolClosed(PoolError):
    """The pool is closed, or not open yet."""

    __module__ = "pgwarden"


class QueryTimeout(PgwardenError, psycopg.OperationalError):
    """A query ran longer than the pool's client-side `query_timeout`.

    The connection it ran on is closed and will not be reused.
    """

    __module__ = "pgwarden"


class ConnectionReturned(PgwardenError, psycopg.InterfaceError):
    """A connection handle was used or given back after it was given back.

    Also raised when a connection is given to a pool it does not come from.
    """

    __module__ = "pgwarden"
