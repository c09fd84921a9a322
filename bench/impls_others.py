"""Other libraries' pools, for reference: SQLAlchemy's QueuePool and asyncpg's.

**SQLAlchemy** (threads): ``create_engine(..., poolclass=QueuePool,
pool_size=N, max_overflow=0)`` with the psycopg driver, connecting through
the same ``psycopg.connect(conninfo)`` as the others (``creator=``). Workers
borrow with `Engine.raw_connection` and run the psycopg workload on the
DBAPI connection it wraps. That is the fair comparison of *pools*: it is
QueuePool's whole checkout (queue, checkout events, pre-ping if on) and
checkin (reset on return: a rollback, which psycopg skips when no
transaction is open). `engine.connect()` would add SQLAlchemy Core's
`Connection` and its statement pipeline (`text()`, compilation cache, result
wrapping): a per-query cost of the SQL layer, not of pooling, that would also
make the workload differ from the other implementations'. So these rows
understate what an application using Core or the ORM pays per borrow.
As for the pools, an open transaction is committed when the block ends.

**asyncpg** (asyncio): ``asyncpg.create_pool(min_size=N, max_size=N)`` with
its own protocol, so its own workload functions (``fetchval("SELECT 1")``
in autocommit; a transaction block for the UPDATE). It does fewer round
trips than psycopg for ``SELECT 1`` (one instead of BEGIN, SELECT, COMMIT)
but resets every connection given back with one more: ``SELECT
pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``.
`AsyncpgNoReset` passes a no-op ``reset`` coroutine, which skips that query
(asyncpg's ``reset=None`` is the default reset, not "none").
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, ClassVar

import asyncpg
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.pool import PoolProxiedConnection, QueuePool

from impls_base import OPEN_TIMEOUT, AsyncImpl, SyncImpl

__all__ = ["Asyncpg", "AsyncpgNoReset", "Sqlalchemy", "SqlalchemyPrePing"]

_IDLE = TransactionStatus.IDLE


# -- SQLAlchemy ---------------------------------------------------------------


def _driver(fairy: PoolProxiedConnection) -> psycopg.Connection[Any]:
    conn = fairy.driver_connection
    assert isinstance(conn, psycopg.Connection)
    return conn


class _Checkout:
    """One `raw_connection()` for a `with` block; yields the psycopg connection."""

    __slots__ = ("_engine", "_fairy")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._fairy: PoolProxiedConnection | None = None

    def __enter__(self) -> psycopg.Connection[Any]:
        self._fairy = fairy = self._engine.raw_connection()
        return _driver(fairy)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fairy, self._fairy = self._fairy, None
        assert fairy is not None
        conn = _driver(fairy)
        try:
            if not conn.closed and conn.pgconn.transaction_status != _IDLE:
                if exc_type is None:
                    conn.commit()
                else:
                    conn.rollback()
        finally:
            fairy.close()  # back to the pool (which invalidates a broken one)


class Sqlalchemy(SyncImpl):
    """SQLAlchemy's QueuePool (FIFO, its default), no pre-ping."""

    name = "sqlalchemy"
    pre_ping: ClassVar[bool] = False

    def __init__(self, dsn: str, *, size: int, workers: int) -> None:
        super().__init__(dsn, size=size, workers=workers)
        self._engine = create_engine(
            "postgresql+psycopg://",
            creator=self._connect,
            poolclass=QueuePool,
            pool_size=size,
            max_overflow=0,
            pool_timeout=OPEN_TIMEOUT,
            pool_pre_ping=type(self).pre_ping,
        )

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn)

    def open(self) -> None:
        # Check out every connection at once (opening them), then give back.
        with contextlib.ExitStack() as stack:
            for _ in range(self.size):
                stack.callback(self._engine.raw_connection().close)

    def connection(self, worker: int) -> _Checkout:
        return _Checkout(self._engine)

    def close(self) -> None:
        self._engine.dispose()


class SqlalchemyPrePing(Sqlalchemy):
    """QueuePool with ``pool_pre_ping=True``: one ``SELECT 1`` per checkout."""

    name = "sqlalchemy+pre_ping"
    pre_ping = True


# -- asyncpg ------------------------------------------------------------------


def asyncpg_params(dsn: str) -> dict[str, Any]:
    """asyncpg's connect keywords for a libpq conninfo (the usual keys)."""
    params = conninfo_to_dict(dsn)
    names = {"host": "host", "user": "user", "password": "password"}
    out: dict[str, Any] = {
        new: params[old] for old, new in names.items() if params.get(old)
    }
    if params.get("dbname"):
        out["database"] = params["dbname"]
    if params.get("port"):
        out["port"] = int(str(params["port"]))
    if params.get("sslmode"):
        out["ssl"] = params["sslmode"]
    return out


async def _no_reset(conn: asyncpg.Connection) -> None:
    """A reset that sends nothing (asyncpg still clears its client state)."""


class Asyncpg(AsyncImpl):
    """asyncpg's pool, with its default reset query on release."""

    name = "asyncpg"
    driver = "asyncpg"
    reset_query: ClassVar[bool] = True

    def __init__(self, dsn: str, *, size: int, workers: int) -> None:
        super().__init__(dsn, size=size, workers=workers)
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            min_size=self.size,
            max_size=self.size,
            reset=None if type(self).reset_query else _no_reset,
            timeout=OPEN_TIMEOUT,
            **asyncpg_params(self.dsn),
        )

    def connection(self, worker: int) -> AbstractAsyncContextManager[Any]:
        assert self._pool is not None
        acquired: AbstractAsyncContextManager[Any] = self._pool.acquire()
        return acquired

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


class AsyncpgNoReset(Asyncpg):
    """asyncpg's pool without the reset query (a no-op ``reset``)."""

    name = "asyncpg-noreset"
    reset_query = False
