"""asyncio cancellation: whenever it strikes, no slot is lost and no work half done."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from pgwarden import AsyncPool
from tests._util import await_until
from tests.pool._helpers import backend_pids, unique_app


def small_pool(dsn: str, **kwargs: Any) -> AsyncPool:
    settings: dict[str, Any] = {
        "min_size": 1,
        "max_size": 3,
        "connection_timeout": 5.0,
        "application_name": unique_app(),
    }
    settings.update(kwargs)
    return AsyncPool(dsn, **settings)


async def assert_quiet(pool: AsyncPool, admin: Any) -> None:
    """Nothing on loan, nobody waiting, and the server agrees on the count."""
    stats = pool.stats()
    assert stats.in_use == 0 and stats.waiting == 0, stats
    app = pool.config.application_name
    await await_until(lambda: len(backend_pids(admin, app)) == pool.stats().size)


async def test_cancelled_while_queued(dsn: str, admin: Any) -> None:
    async with small_pool(dsn, min_size=3, max_size=3) as pool:
        await pool.wait()
        held = [await pool.getconn() for _ in range(3)]
        waiters = [asyncio.create_task(pool.getconn(timeout=10)) for _ in range(9)]
        await await_until(lambda: pool.stats().waiting == 9)
        for task in reversed(waiters):
            task.cancel()
        for task in waiters:
            with pytest.raises(asyncio.CancelledError):
                await task
        assert pool.stats().waiting == 0
        for conn in held:
            await pool.putconn(conn)
        assert pool.stats().idle == 3
        async with pool.connection(timeout=1) as conn:
            await conn.execute("SELECT 1")
        await assert_quiet(pool, admin)


async def test_cancelled_at_the_instant_of_hand_off(dsn: str, admin: Any) -> None:
    async with small_pool(dsn, min_size=1, max_size=1) as pool:
        held = await pool.getconn()
        pid = held.info.backend_pid
        waiter = asyncio.create_task(pool.getconn(timeout=10))
        await await_until(lambda: pool.stats().waiting == 1)
        # Giving back an idle connection hands it to the waiter without
        # yielding to the loop; the waiter is cancelled before it can run.
        await pool.putconn(held)
        assert pool.stats().in_use == 1  # assigned to the waiter
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        stats = pool.stats()
        assert stats.in_use == 0 and stats.idle == 1
        async with pool.connection(timeout=1) as conn:
            assert conn.info.backend_pid == pid
        await assert_quiet(pool, admin)


async def test_wait_for_bounds_getconn(dsn: str, admin: Any) -> None:
    async with small_pool(dsn, min_size=1, max_size=1) as pool:
        held = await pool.getconn()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.getconn(timeout=10), 0.2)
        assert time.monotonic() - t0 < 1.0
        assert pool.stats().waiting == 0
        await pool.putconn(held)
        await assert_quiet(pool, admin)


async def test_cancelled_mid_query_rolls_back_promptly(dsn: str, admin: Any) -> None:
    admin.execute("CREATE TABLE t (x int)")
    async with small_pool(dsn, min_size=1, max_size=1) as pool:
        started = asyncio.Event()

        async def work() -> None:
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO t VALUES (1)")
                started.set()
                await conn.execute("SELECT pg_sleep(10)")

        task = asyncio.create_task(work())
        await started.wait()
        await await_until(
            lambda: admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE query LIKE 'SELECT pg_sleep%%' AND state = 'active'"
            ).fetchone()[0]
        )
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 1.0
        async with pool.connection(timeout=5) as conn:
            await conn.execute("SELECT 1")
        await assert_quiet(pool, admin)
    assert admin.execute("SELECT count(*) FROM t").fetchone() == (0,)


async def test_cancelled_while_holding_rolls_back_and_reuses(
    dsn: str, admin: Any
) -> None:
    admin.execute("CREATE TABLE t (x int)")
    async with small_pool(dsn, min_size=1, max_size=1) as pool:
        started = asyncio.Event()
        pid = 0

        async def work() -> None:
            nonlocal pid
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                await conn.execute("INSERT INTO t VALUES (1)")
                started.set()
                await asyncio.sleep(10)

        task = asyncio.create_task(work())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with pool.connection(timeout=5) as conn:
            assert conn.info.backend_pid == pid  # rolled back, not discarded
            tx = conn.info.transaction_status
            assert tx == psycopg.pq.TransactionStatus.IDLE
        await assert_quiet(pool, admin)
    assert admin.execute("SELECT count(*) FROM t").fetchone() == (0,)


async def test_cancelled_during_commit_loses_no_slot(dsn: str, admin: Any) -> None:
    async with small_pool(dsn, min_size=1, max_size=2) as pool:
        for delay in (0.0, 0.001, 0.005):

            async def work() -> None:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")

            task = asyncio.create_task(work())
            await asyncio.sleep(delay)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await await_until(lambda: pool.stats().in_use == 0)
        async with pool.connection(timeout=5) as conn:
            await conn.execute("SELECT 1")
        await assert_quiet(pool, admin)


async def test_many_random_cancellations(dsn: str, admin: Any) -> None:
    async with small_pool(dsn, min_size=2, max_size=3) as pool:

        async def work(i: int) -> None:
            async with pool.connection(timeout=5) as conn:
                await conn.execute("SELECT pg_sleep(%s)", [(i % 5) / 1000])

        for round_ in range(20):
            tasks = [asyncio.create_task(work(i)) for i in range(12)]
            await asyncio.sleep((round_ % 7) / 1000)
            for task in tasks[round_ % 3 :: 2]:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                assert result is None or isinstance(result, asyncio.CancelledError)
        await await_until(lambda: pool.stats().in_use == 0)
        await assert_quiet(pool, admin)
