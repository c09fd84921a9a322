"""The implementations under test, and the lists the runner measures.

Here: direct connections, psycopg_pool and pgwarden; SQLAlchemy's QueuePool
and asyncpg's pool are in impls_others.py, the interface in impls_base.py.

Every psycopg implementation connects with the same conninfo and psycopg's
defaults (autocommit off). pgwarden adds application_name and, in
``options``, the server-side statement_timeout and
idle_in_transaction_session_timeout: that costs nothing per borrow.

To add an implementation, subclass `SyncImpl` or `AsyncImpl` and list it in
`SYNC_IMPLS` or `ASYNC_IMPLS`.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import TracebackType
from typing import Any, ClassVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, ConnectionPool

import pgwarden
from impls_base import OPEN_TIMEOUT, AsyncImpl, SyncImpl
from impls_others import (
    Asyncpg,
    AsyncpgNoReset,
    Sqlalchemy,
    SqlalchemyPrePing,
)

__all__ = ["ASYNC_IMPLS", "SYNC_IMPLS", "AsyncImpl", "SyncImpl"]

_IDLE = TransactionStatus.IDLE


# -- direct: one connection per worker, the upper bound ---------------------


class _Own:
    """The worker's own connection, finished as a pool block would finish it.

    On exit an open transaction is committed (rolled back on an exception),
    as the pools' ``connection()`` blocks do, so every implementation does
    the same round trips.
    """

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def __enter__(self) -> psycopg.Connection[Any]:
        return self.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.conn.pgconn.transaction_status != _IDLE:
            if exc_type is None:
                self.conn.commit()
            else:
                self.conn.rollback()


class _AOwn:
    """`_Own` for asyncio."""

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        return self.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.conn.pgconn.transaction_status != _IDLE:
            if exc_type is None:
                await self.conn.commit()
            else:
                await self.conn.rollback()


class Direct(SyncImpl):
    """Each worker owns one persistent connection: no pool at all."""

    name = "direct"
    reference = True

    def __init__(self, dsn: str, *, size: int, workers: int) -> None:
        super().__init__(dsn, size=size, workers=workers)
        self._own: list[_Own] = []

    def open(self) -> None:
        for _ in range(self.workers):
            self._own.append(_Own(psycopg.connect(self.dsn)))

    def connection(self, worker: int) -> _Own:
        return self._own[worker]

    def close(self) -> None:
        for own in self._own:
            own.conn.close()


class DirectAsync(AsyncImpl):
    """`Direct` for asyncio."""

    name = "direct-async"
    reference = True

    def __init__(self, dsn: str, *, size: int, workers: int) -> None:
        super().__init__(dsn, size=size, workers=workers)
        self._own: list[_AOwn] = []

    async def open(self) -> None:
        for _ in range(self.workers):  # one at a time, as Direct does
            self._own.append(_AOwn(await psycopg.AsyncConnection.connect(self.dsn)))

    def connection(self, worker: int) -> _AOwn:
        return self._own[worker]

    async def close(self) -> None:
        for own in self._own:
            await own.conn.close()


# -- psycopg_pool -----------------------------------------------------------


class PsycopgPool(SyncImpl):
    """`psycopg_pool.ConnectionPool`, no check on borrow."""

    name = "psycopg_pool"
    check: ClassVar[Any] = None

    def __init__(self, dsn: str, *, size: int, workers: int) -> None:
        super().__init__(dsn, size=size, workers=workers)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            dsn,
            min_size=size,
            max_size=size,
            open=False,
            check=type(self).check,  # a plain function, not a method
            name=self.name,
        )

    def open(self) -> None:
        self._pool.open(wait=True, timeout=OPEN_TIMEOUT)

    def connection(self, worker: int) -> AbstractContextManager[Any]:
        return self._pool.connection()

    def close(self) -> None:
        self._pool.close()


class PsycopgPoolChecked(PsycopgPool):
    """`psycopg_pool.ConnectionPool` checking each connection it lends."""

    name = "psycopg_pool+check"
    check = ConnectionPool.check_connection


class PsycopgPoolAsync(AsyncImpl):
    """`psycopg_pool.AsyncConnectionPool`, no check on borrow."""

    name = "psycopg_pool-async"
    check: ClassVar[Any] = None

    def __init__(self, dsn: str, *, size: int, workers: int) -> None:
        super().__init__(dsn, size=size, workers=workers)
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = (
            AsyncConnectionPool(
                dsn,
                min_size=size,
                max_size=size,
                open=False,
                check=type(self).check,  # a plain function, not a method
                name=self.name,
            )
        )

    async def open(self) -> None:
        await self._pool.open(wait=True, timeout=OPEN_TIMEOUT)

    def connection(self, worker: int) -> AbstractAsyncContextManager[Any]:
        return self._pool.connection()

    async def close(self) -> None:
        await self._pool.close()


class PsycopgPoolCheckedAsync(PsycopgPoolAsync):
    """`psycopg_pool.AsyncConnectionPool` checking each connection it lends."""

    name = "psycopg_pool+check-async"
    check = AsyncConnectionPool.check_connection


# -- pgwarden ---------------------------------------------------------------


class Pgwarden(SyncImpl):
    """`pgwarden.Pool` with its defaults (test_on_borrow, leak detection on)."""

    name = "pgwarden"
    overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self, dsn: str, *, size: int, workers: int) -> None:
        super().__init__(dsn, size=size, workers=workers)
        self._pool = pgwarden.Pool(
            dsn, min_size=size, max_size=size, **type(self).overrides
        )

    def open(self) -> None:
        self._pool.open(wait=True, timeout=OPEN_TIMEOUT)

    def connection(self, worker: int) -> AbstractContextManager[Any]:
        return self._pool.connection()

    def close(self) -> None:
        self._pool.close()


class PgwardenNoLeak(Pgwarden):
    """`pgwarden.Pool` with leak detection off: target 6, on `acquire` only."""

    name = "pgwarden-noleak"
    overrides = {"leak_detection_threshold": 0}
    cells = frozenset({"acquire"})


# Where callers queue: where adaptive_concurrency can act at all.
QUEUEING_CELLS = frozenset({"select1-64x4", "select1-64x16", "txn-16x8"})


class PgwardenNoAdaptive(Pgwarden):
    """`pgwarden.Pool` with `adaptive_concurrency` off (on by default for
    threads), where callers queue."""

    name = "pgwarden-noadaptive"
    overrides = {"adaptive_concurrency": False}
    cells = QUEUEING_CELLS


class PgwardenAsync(AsyncImpl):
    """`pgwarden.AsyncPool` with its defaults."""

    name = "pgwarden-async"
    overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self, dsn: str, *, size: int, workers: int) -> None:
        super().__init__(dsn, size=size, workers=workers)
        self._pool = pgwarden.AsyncPool(
            dsn, min_size=size, max_size=size, **type(self).overrides
        )

    async def open(self) -> None:
        await self._pool.open(wait=True, timeout=OPEN_TIMEOUT)

    def connection(self, worker: int) -> AbstractAsyncContextManager[Any]:
        return self._pool.connection()

    async def close(self) -> None:
        await self._pool.close()


class PgwardenNoLeakAsync(PgwardenAsync):
    """`pgwarden.AsyncPool` with leak detection off, on `acquire` only."""

    name = "pgwarden-noleak-async"
    overrides = {"leak_detection_threshold": 0}
    cells = frozenset({"acquire"})


class PgwardenAdaptiveAsync(PgwardenAsync):
    """`pgwarden.AsyncPool` with `adaptive_concurrency` on (off by default for
    asyncio), where callers queue."""

    name = "pgwarden+adaptive-async"
    overrides = {"adaptive_concurrency": True}
    cells = QUEUEING_CELLS


SYNC_IMPLS: tuple[type[SyncImpl], ...] = (
    Direct,
    PsycopgPool,
    PsycopgPoolChecked,
    Sqlalchemy,
    SqlalchemyPrePing,
    Pgwarden,
    PgwardenNoLeak,
    PgwardenNoAdaptive,
)
ASYNC_IMPLS: tuple[type[AsyncImpl], ...] = (
    DirectAsync,
    PsycopgPoolAsync,
    PsycopgPoolCheckedAsync,
    Asyncpg,
    AsyncpgNoReset,
    PgwardenAsync,
    PgwardenNoLeakAsync,
    PgwardenAdaptiveAsync,
)
