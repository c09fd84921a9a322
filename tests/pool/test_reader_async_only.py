"""Under load, an asyncio pool's connections keep their sockets registered with
the event loop between waits (`pool/_waiting.py`, `Reader`), against a real
server: fewer registrations, and every way a connection ends lets its
registration and its duplicate socket go."""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgwarden import AsyncPool, QueryTimeout
from pgwarden.pool._waiting import Reader
from tests._util import await_until
from tests.faults.invariants import acheck_closed
from tests.pool._helpers import backend_pids, closed, socket_of, unique_app


def small_pool(dsn: str, size: int, **kwargs: Any) -> AsyncPool:
    return AsyncPool(
        dsn,
        min_size=size,
        max_size=size,
        connection_timeout=5.0,
        application_name=unique_app(),
        **kwargs,
    )


async def load(pool: AsyncPool, tasks: int = 8, rounds: int = 20) -> None:
    """`tasks` tasks running queries at once, each checking its answers."""

    async def worker(i: int) -> None:
        for _ in range(rounds):
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT %s::int", (i,))
                assert await cur.fetchone() == (i,)

    await asyncio.gather(*(worker(i) for i in range(tasks)))


def readers(pool: AsyncPool) -> list[Reader]:
    return [entry.conn._pgw_reader for entry in pool._core.entries]


async def test_under_load_a_socket_is_registered_once_and_let_go_on_close(
    dsn: str, admin: Any
) -> None:
    pool = small_pool(dsn, 4)
    await pool.open(wait=True)
    loop = asyncio.get_running_loop()
    registrations = 0
    add_reader = loop.add_reader

    def counting(fd: int, callback: Any, *args: Any) -> Any:
        nonlocal registrations
        registrations += 1
        return add_reader(fd, callback, *args)

    loop.add_reader = counting  # type: ignore[method-assign]
    try:
        await load(pool, tasks=16, rounds=20)
    finally:
        loop.add_reader = add_reader  # type: ignore[method-assign]
    # 320 operations of three waits each: without the reader, 960.
    assert registrations < 320, registrations
    kept = [socket_of(r) for r in readers(pool) if r.registered]
    assert kept
    await pool.close()
    assert not any(r.registered for r in readers(pool))
    assert all(closed(fd, inode) for fd, inode in kept)
    await acheck_closed(pool, admin)


async def test_a_backend_ended_while_registered_is_let_go_and_not_lent(
    dsn: str, admin: Any
) -> None:
    async with small_pool(dsn, 2) as pool:
        await pool.wait(5)
        await load(pool, tasks=4, rounds=5)
        kept = [(r, socket_of(r)) for r in readers(pool) if r.registered]
        assert kept
        app = pool.config.application_name
        for pid in backend_pids(admin, app):
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # The end of each session is seen without a borrow, and let go of.
        await await_until(lambda: not any(r.registered for r, _ in kept))
        assert all(closed(fd, inode) for _, (fd, inode) in kept)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)


async def test_a_query_timeout_under_load_lets_the_socket_go(dsn: str) -> None:
    async with small_pool(dsn, 2, query_timeout=0.5) as pool:
        await pool.wait(5)
        async with pool.connection():  # a second connection busy: the reader
            async with pool.connection() as conn:
                reader = conn._pgw_reader
                await conn.execute("SELECT 1")
                assert reader.registered
                sock = socket_of(reader)
                with pytest.raises(QueryTimeout):
                    await conn.execute("SELECT pg_sleep(10)")
                assert not reader.registered and closed(*sock)
                assert conn.closed


async def test_a_task_cancelled_under_load_lets_the_socket_go(dsn: str) -> None:
    async with small_pool(dsn, 2) as pool:
        await pool.wait(5)
        async with pool.connection():
            started = asyncio.Event()
            got: list[Reader] = []

            async def sleeper() -> None:
                async with pool.connection() as conn:
                    got.append(conn._pgw_reader)
                    await conn.execute("SELECT 1")
                    started.set()
                    await conn.execute("SELECT pg_sleep(10)")

            task = asyncio.create_task(sleeper())
            await started.wait()
            assert got[0].registered
            sock = socket_of(got[0])
            await await_until(lambda: got[0]._fut is not None)  # in the query's wait
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
            assert not got[0].registered and closed(*sock)
        assert pool.stats().in_use == 0


async def test_a_notification_while_idle_ends_the_registration(
    dsn: str, admin: Any
) -> None:
    channel = unique_app()
    async with small_pool(dsn, 2) as pool:
        await pool.wait(5)
        async with pool.connection():
            async with pool.connection() as conn:
                reader = conn._pgw_reader
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                assert reader.registered
            assert reader.registered  # committed on the way back: still kept
        admin.execute("SELECT pg_notify(%s, 'hello')", (channel,))
        # Nobody waits on the idle connection: rather than be told on every
        # turn of the loop, the reader lets the socket go.
        await await_until(lambda: not reader.registered)
        await load(pool, tasks=2, rounds=3)  # and the pool serves on


async def test_closing_a_borrowed_connection_under_load_lets_the_socket_go(
    dsn: str,
) -> None:
    async with small_pool(dsn, 2) as pool:
        await pool.wait(5)
        async with pool.connection():
            async with pool.connection() as conn:
                reader = conn._pgw_reader
                await conn.execute("SELECT 1")
                sock = socket_of(reader)
                await conn.close()
        await await_until(lambda: not reader.registered)
        assert closed(*sock)
        await load(pool, tasks=4, rounds=5)  # a new connection gets the number


def open_fds() -> int:
    """How many file descriptors this process has open."""
    count = 0
    for fd in range(4096):
        try:
            os.fstat(fd)
        except OSError:
            continue
        count += 1
    return count


async def test_no_socket_outlives_the_pool_after_sessions_end_under_load(
    dsn: str, admin: Any
) -> None:
    before = open_fds()
    pool = small_pool(dsn, 4, query_timeout=2.0)
    await pool.open(wait=True)
    app = pool.config.application_name
    stop = asyncio.Event()
    done = 0

    async def worker() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                async with pool.connection(timeout=2) as conn:
                    await conn.execute("SELECT pg_sleep(0.001)")
                done += 1
            except psycopg.OperationalError:
                pass  # its session was ended under it

    workers = [asyncio.create_task(worker()) for _ in range(12)]
    for _ in range(5):
        await await_until(lambda: len(backend_pids(admin, app)) == 4, timeout=10)
        target = done + 20
        await await_until(lambda: done >= target, timeout=10)  # noqa: B023
        for pid in backend_pids(admin, app):
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    stop.set()
    await asyncio.gather(*workers)
    await pool.close()
    await acheck_closed(pool, admin)

    def all_closed() -> bool:
        gc.collect()
        return open_fds() <= before

    await await_until(all_closed, message=f"{before} open files, as before the pool")


def test_a_pool_never_closed_leaves_no_socket_open_after_its_loop(dsn: str) -> None:
    kept: list[tuple[int, int]] = []

    async def forgetful() -> None:
        pool = small_pool(dsn, 4)
        await pool.open(wait=True)
        await load(pool, tasks=8, rounds=5)
        kept.extend(socket_of(r) for r in readers(pool) if r.registered)

    asyncio.run(forgetful())  # the pool is never closed
    gc.collect()
    assert kept
    assert all(closed(fd, inode) for fd, inode in kept)
