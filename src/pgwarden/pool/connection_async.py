"""The connection class the pool hands out.

A borrower gets a *handle*: an instance of the class below that shares its
state with the pool's own connection object, so it is a real
`psycopg.AsyncConnection` with no proxy in the way. When the connection is
given back, the handle is detached: any further use raises `ConnectionReturned`,
so a stale handle can never run on a connection that now belongs to someone else.

Every operation goes through `wait()`, which enforces the pool's client-side
`query_timeout`: a query that outlives it has its connection closed at once
(the server is asked to cancel it in the background) and the caller gets
`QueryTimeout`. A task cancelled mid-query is treated the same way. Waiting
for notifications is not a query: `notifies()` keeps psycopg's behaviour.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg
from psycopg import errors as e
from psycopg import generators, waiting
from psycopg.abc import RV, PQGen
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from ..errors import ConnectionReturned, QueryTimeout
from ._adapters import watched_adapters
from ._cancel import abandon

if True:  # ASYNC
    import os
    from asyncio import Lock as _ConnectionLock

    from ._waiting import Alarm, Reader, wait_async

    # Keeping a socket registered between waits takes a duplicate made with
    # os.dup(), which a Windows socket handle is not.
    _KEEP_REGISTERED = os.name == "posix"
else:
    from threading import Lock as _ConnectionLock

if TYPE_CHECKING:
    from ._core import Entry, PoolCore

# How often a wait wakes up to notice interrupts (as psycopg does).
_WAIT_INTERVAL = 0.1

# Waiting for notifications (`notifies()`) is not a query: no query_timeout.
_NOTIFIES = generators.notifies.__code__

# psycopg's defaults, which pooled connections are opened with.
PREPARE_THRESHOLD = 5
PREPARED_MAX = 100

# How long the background cancel request may take to reach the server.
CANCEL_TIMEOUT = 5.0

_ACTIVE = TransactionStatus.ACTIVE


class AsyncPooledConnection(psycopg.AsyncConnection[Any]):
    """A `psycopg.AsyncConnection` lent by an `AsyncPool`."""

    # Per handle, not shared: the pool's Entry while on loan, else None.
    __slots__ = ("_pgw_entry",)
    _pgw_entry: Entry | None

    _pgw_timeout: float | None  # client-side timeout of every operation
    _pgw_pool: str  # the owning pool's name, for messages
    if True:  # ASYNC
        _pgw_alarm: Alarm  # enforces _pgw_timeout
        _pgw_reader: Reader  # keeps the socket registered under load
        _pgw_core: PoolCore  # the owning pool's: how many connections are busy

    async def wait(
        self,
        gen: PQGen[RV],
        interval: float = _WAIT_INTERVAL,
        timeout: float | None = None,
    ) -> RV:
        # Waiting for notifications has the caller's timeout only, whose
        # expiry psycopg expects: it ends the wait, not the connection.
        notifying = getattr(gen, "gi_code", None) is _NOTIFIES
        limit = timeout if timeout is not None or notifying else self._pgw_timeout
        pgconn = self.pgconn  # the handle may be detached while this runs
        try:
            if True:  # ASYNC
                reader = self._pgw_reader
                if _KEEP_REGISTERED and self._pgw_core.busy > 1:
                    # Other connections on loan: the socket stays registered.
                    return await wait_async(
                        gen, pgconn.socket, self._pgw_alarm, limit, reader
                    )
                if reader.registered:
                    reader.stop()
                return await wait_async(gen, pgconn.socket, self._pgw_alarm, limit)
            else:
                return waiting.wait(
                    gen, pgconn.socket, interval=interval, timeout=limit
                )
        except e._WaitTimeout:
            if notifying:
                raise
            self._pgw_abort(pgconn)
            raise QueryTimeout(
                f"the query ran longer than {limit:g} s (query_timeout) and was"
                " cancelled; its connection was closed"
                f" (pool {self.__dict__.get('_pgw_pool')!r})"
            ) from None
        except e.Error:
            raise  # an error from the server or libpq: psycopg knows what to do
        except BaseException:
            # Cancelled or interrupted mid-query: the connection is in an
            # unknown state. Close it now rather than waiting on the server.
            if pgconn.transaction_status == _ACTIVE:
                self._pgw_abort(pgconn)
            raise

    def _pgw_abort(self, pgconn: Any) -> None:
        """Close the connection now; the server is told to stop its query."""
        if "pgconn" in self.__dict__:  # still attached: psycopg's own flag
            self._closed = True
            if True:  # ASYNC
                self._pgw_reader.stop()
        abandon(pgconn, CANCEL_TIMEOUT)

    def _pgw_restore(self) -> None:
        """Undo what a borrower changed on the client side; no round trip.

        Transaction characteristics, row and cursor factories, notice and
        notify handlers, adapters and the prepare threshold are settings of
        the connection object: without this, the next borrower would get a
        connection in autocommit, returning dicts, or calling someone else's
        handlers.
        """
        d = self.__dict__
        if d["_pipeline"] is not None:  # libpq is still in pipeline mode
            raise e.InterfaceError("given back inside a pipeline() block")
        if d["_autocommit"]:
            d["_autocommit"] = False
        if (
            d["_isolation_level"] is not None
            or d["_read_only"] is not None
            or d["_deferrable"] is not None
        ):
            d["_isolation_level"] = d["_read_only"] = d["_deferrable"] = None
            d["_begin_statement"] = b""  # psycopg's BEGIN made from those three
        if d["row_factory"] is not tuple_row:
            d["row_factory"] = tuple_row
        if d["cursor_factory"] is not psycopg.AsyncCursor:
            d["cursor_factory"] = psycopg.AsyncCursor
        if d["server_cursor_factory"] is not psycopg.AsyncServerCursor:
            d["server_cursor_factory"] = psycopg.AsyncServerCursor
        if len(d["_notice_handlers"]) > 1:  # the first one is the pool's
            del d["_notice_handlers"][1:]
        if d["_notify_handlers"]:
            d["_notify_handlers"].clear()
        backlog = d["_notifies_backlog"]
        if backlog:  # notifications received for the borrower, never read
            backlog.clear()
        elif backlog is None:
            # A notifies() generator left open: it holds the connection's
            # lock, and would put its backlog back on the dead handle.
            d["_notifies_backlog"] = deque()
            d["lock"] = _ConnectionLock()
        if d["_tpc"] is not None:  # a prepared transaction is not the session's
            d["_tpc"] = None
        prepared = d["_prepared"]
        if prepared.prepare_threshold != PREPARE_THRESHOLD:
            prepared.prepare_threshold = PREPARE_THRESHOLD
        if prepared.prepared_max != PREPARED_MAX:
            prepared.prepared_max = PREPARED_MAX
        adapters = d["_adapters"]
        if adapters.changed or adapters.types.changed:
            self._pgw_fresh_adapters()

    def _pgw_forget_prepared(self) -> None:
        """The server has dropped every prepared statement (`DISCARD ALL`):
        so does psycopg's cache of them."""
        prepared = self._prepared
        prepared._names.clear()
        prepared._counts.clear()
        prepared._to_flush.clear()

    def _pgw_fresh_adapters(self) -> None:
        """Give the connection adapters of its own, made from psycopg's
        global ones, that notice what a borrower registers on them."""
        self._adapters = watched_adapters()

    def __copy__(self) -> NoReturn:
        # A copy would share the pool's connection but not the loan: it would
        # outlive the give-back, on the next borrower's session.
        raise TypeError("a pooled connection can't be copied")

    def __del__(self, _warn: Any = None, /) -> None:
        # The pool owns the connection and closes it; handles just go away.
        pass


class AsyncReturnedConnection(AsyncPooledConnection):
    """What a handle becomes once given back: any use raises `ConnectionReturned`.

    A class of its own, rather than a `__getattr__` on the handle's class,
    because a `__getattr__` makes every attribute access on a borrowed
    connection four times slower (psycopg reads hundreds per query).
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        # Reached for every attribute of the connection: a detached handle's
        # __dict__ is empty.
        raise ConnectionReturned(
            f"this connection was given back to the pool; it can't be used"
            f" any more (accessing {name!r})"
        )

    def __repr__(self) -> str:
        return f"<{AsyncPooledConnection.__qualname__} [returned to the pool]>"
