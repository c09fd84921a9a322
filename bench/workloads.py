"""What the workers do (workloads) and the grid of measurements (cells).

A workload is one small function per driver: it gets a borrowed connection
and a per-worker random generator, does one operation and returns. The
harness times the borrow around it; the workload never sees the pool.

The drivers are "psycopg" (every psycopg implementation) and "asyncpg". To
add one, write its functions and add them to the `sync_ops` / `async_ops` of
the workloads it supports; cells whose workload has no function for an
implementation's driver are skipped for it.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

__all__ = [
    "ACCOUNTS",
    "ACCOUNTS_TABLE",
    "CELLS",
    "AsyncOp",
    "Cell",
    "SyncOp",
    "Workload",
    "drop_tables",
    "setup_tables",
]

# The connection type depends on the implementation's driver, hence Any.
SyncOp = Callable[[Any, random.Random], None]
AsyncOp = Callable[[Any, random.Random], Awaitable[None]]

ACCOUNTS_TABLE = "pgwarden_bench_accounts"
ACCOUNTS = 1000

_UPDATE = f"UPDATE {ACCOUNTS_TABLE} SET balance = balance + 1 WHERE id = %s"
_UPDATE_DOLLAR = _UPDATE.replace("%s", "$1")  # asyncpg's placeholders


@dataclass(frozen=True)
class Workload:
    """One operation, written once per driver (keyed by the driver's name)."""

    name: str
    description: str
    sync_ops: Mapping[str, SyncOp]
    async_ops: Mapping[str, AsyncOp]

    def supports(self, kind: str, driver: str) -> bool:
        """Whether there is a function for `driver` used by `kind` workers."""
        return driver in (self.sync_ops if kind == "sync" else self.async_ops)

    def op(self, kind: str, driver: str) -> SyncOp | AsyncOp:
        """The function for `driver` used by `kind` ("sync" or "async") workers."""
        return (self.sync_ops if kind == "sync" else self.async_ops)[driver]


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a workload, how many workers, how big the pool.

    Every pool gets ``min_size = max_size = pool_size``; the direct
    implementations open one connection per worker instead.
    """

    id: str
    workload: Workload
    workers: int
    pool_size: int
    title: str


# -- psycopg ----------------------------------------------------------------


def _nothing(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    pass


async def _anothing(conn: psycopg.AsyncConnection[Any], rng: random.Random) -> None:
    pass


def _select1(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    # autocommit is off: this opens a transaction, which the block's exit commits.
    conn.execute("SELECT 1").fetchone()


async def _aselect1(conn: psycopg.AsyncConnection[Any], rng: random.Random) -> None:
    cur = await conn.execute("SELECT 1")
    await cur.fetchone()


def _transfer(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    with conn.transaction():  # BEGIN ... COMMIT
        conn.execute(_UPDATE, (rng.randint(1, ACCOUNTS),))


async def _atransfer(conn: psycopg.AsyncConnection[Any], rng: random.Random) -> None:
    async with conn.transaction():
        await conn.execute(_UPDATE, (rng.randint(1, ACCOUNTS),))


# -- asyncpg (its own protocol: autocommit unless in a transaction block) -----


async def _pg_select1(conn: Any, rng: random.Random) -> None:
    await conn.fetchval("SELECT 1")


async def _pg_transfer(conn: Any, rng: random.Random) -> None:
    async with conn.transaction():  # BEGIN ... COMMIT
        await conn.execute(_UPDATE_DOLLAR, rng.randint(1, ACCOUNTS))


ACQUIRE = Workload(
    "acquire",
    "borrow a connection and give it back, no query",
    {"psycopg": _nothing},
    {"psycopg": _anothing, "asyncpg": _anothing},
)
SELECT1 = Workload(
    "select1",
    "SELECT 1 (an implicit transaction, committed when the block ends)",
    {"psycopg": _select1},
    {"psycopg": _aselect1, "asyncpg": _pg_select1},
)
TRANSACTION = Workload(
    "transaction",
    f"BEGIN; UPDATE one random row of {ACCOUNTS}; COMMIT",
    {"psycopg": _transfer},
    {"psycopg": _atransfer, "asyncpg": _pg_transfer},
)

CELLS: tuple[Cell, ...] = (
    Cell("acquire", ACQUIRE, 1, 4, "acquire+release only, 1 worker, pool 4"),
    Cell("select1-1x4", SELECT1, 1, 4, "SELECT 1, 1 worker, pool 4"),
    Cell("select1-64x4", SELECT1, 64, 4, "SELECT 1, 64 workers over 4 connections"),
    Cell("select1-64x16", SELECT1, 64, 16, "SELECT 1, 64 workers over 16 connections"),
    Cell("txn-16x8", TRANSACTION, 16, 8, "short transaction, 16 workers over 8"),
)


# -- database setup ---------------------------------------------------------


def setup_tables(dsn: str) -> None:
    """(Re)create the table the transaction workload updates."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {ACCOUNTS_TABLE}")
        conn.execute(
            f"CREATE TABLE {ACCOUNTS_TABLE}"
            " (id integer PRIMARY KEY, balance bigint NOT NULL DEFAULT 0)"
            " WITH (fillfactor = 50)"  # room for HOT updates
        )
        conn.execute(
            f"INSERT INTO {ACCOUNTS_TABLE} (id) SELECT generate_series(1, %s)",
            (ACCOUNTS,),
        )
        conn.execute(f"VACUUM ANALYZE {ACCOUNTS_TABLE}")


def drop_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {ACCOUNTS_TABLE}")
