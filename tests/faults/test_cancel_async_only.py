"""asyncio-only faults: cancellation at every hand-off, and event loops.

Scenarios 19-21 (cancellation while queued, at the instant of hand-off, during
validation, rollback and connect; `wait_for`, `asyncio.timeout`, TaskGroup) and
31 (a pool created outside a loop, opened twice at once, used from another
loop) of the reliability research. `tests/pool/test_cancellation.py` covers
the basic cases; these go further, freezing the pool at its named seams
(`pool._seams`) to cancel at the worst instant. Every test ends with the
invariant checker (`acheck_pool`, and `acheck_closed` when it closes the pool).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from pgwarden import AsyncPool, PgwardenError, PoolClosed, PoolTimeout
from pgwarden.pool import pool_async
from pgwarden.pool._core import Entry
from tests._util import await_until
from tests.faults.invariants import acheck_closed, acheck_pool, bounded
from tests.pool._helpers import backend_pids, unique_app

# A validation query that sleeps 10 s while the table `hang` has a row.
HANGING_CHECK = (
    "SELECT pg_sleep(CASE WHEN EXISTS (SELECT FROM hang) THEN 10 ELSE 0 END)"
)


def small_pool(dsn: str, **kwargs: Any) -> AsyncPool:
    """A pool with test-sized timeouts and its own application_name."""
    settings: dict[str, Any] = {
        "min_size": 1,
        "max_size": 1,
        "connection_timeout": 3.0,
        "query_timeout": 5.0,
        "application_name": unique_app(),
    }
    settings.update(kwargs)
    return AsyncPool(dsn, **settings)


class Hold:
    """A seam hook that holds the pool at its hand-off point until released."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self._released = asyncio.Event()

    async def hook(self, entry: Entry) -> None:
        self.entered.set()
        await self._released.wait()

    def release(self) -> None:
        self._released.set()


def force_validation(pool: AsyncPool) -> None:
    """Make the next borrow run the validation query on the idle connections."""
    with pool._lock:
        pool._core.suspect_before = time.monotonic()


def count(admin: Any, query: str) -> int:
    row = admin.execute(query).fetchone()
    assert row is not None
    return int(row[0])


# -- 19. cancelled while queued -------------------------------------------------


async def test_cancelled_waiters_leave_the_others_served_in_order(
    dsn: str, admin: Any
) -> None:
    """Scenario 19: cancelling every other queued caller, in reverse order,
    gives each of them `CancelledError` and leaves the rest served first come,
    first served; the queue count ends at zero and no connection is lost."""
    async with small_pool(dsn, min_size=2, max_size=2) as pool:
        await pool.wait(5)
        held = [await pool.getconn(), await pool.getconn()]
        served: list[int] = []

        async def waiter(i: int) -> None:
            async with pool.connection(timeout=10):
                served.append(i)
                await asyncio.sleep(0.01)

        tasks = []
        for i in range(10):
            tasks.append(asyncio.create_task(waiter(i)))
            await await_until(lambda: pool.stats().waiting == len(tasks))
        for task in reversed(tasks[1::2]):
            task.cancel()
        for task in tasks[1::2]:
            with pytest.raises(asyncio.CancelledError):
                await task
        assert pool.stats().waiting == 5
        for conn in held:
            await pool.putconn(conn)
        await asyncio.gather(*tasks[0::2])
        assert served == [0, 2, 4, 6, 8]
        stats = pool.stats()
        assert (stats.waiting, stats.in_use, stats.idle) == (0, 0, 2)
        await acheck_pool(pool, admin)


async def test_waiter_behind_cancelled_and_timed_out_ones_is_served(
    dsn: str, admin: Any
) -> None:
    """Scenarios 19 and 20: when a connection comes back just as the first
    waiter is cancelled, with a timed-out waiter behind it, the next live
    waiter is served at once and the queue count stays exact."""
    async with small_pool(dsn) as pool:
        held = await pool.getconn()
        first = asyncio.create_task(pool.getconn(timeout=5))
        await await_until(lambda: pool.stats().waiting == 1)
        impatient = asyncio.create_task(pool.getconn(timeout=0.1))
        await await_until(lambda: pool.stats().waiting == 2)
        last = asyncio.create_task(pool.getconn(timeout=1.5))
        await await_until(lambda: pool.stats().waiting == 3)
        with pytest.raises(PoolTimeout):
            await impatient
        assert pool.stats().waiting == 2

        first.cancel()  # its future is cancelled now; the task runs later
        await pool.putconn(held)  # hands the connection on without yielding
        with pytest.raises(asyncio.CancelledError):
            await first
        try:
            with bounded(0.0, 0.5):
                conn = await asyncio.wait_for(asyncio.shield(last), 0.5)
            await pool.putconn(conn)
        finally:
            if not last.done():
                await asyncio.wait([last])
        assert pool.stats().waiting == 0
        await acheck_pool(pool, admin)


async def test_cancelled_while_its_connection_is_opened_keeps_the_connection(
    dsn: str, admin: Any
) -> None:
    """Scenarios 19 and 21: a caller cancelled while the connection opened
    for it is still being made gets `CancelledError`; the connection, once
    made, joins the pool and serves the next caller."""
    async with small_pool(dsn, min_size=0) as pool:
        hold = Hold()
        pool._seams = {"connect": hold.hook}
        task = asyncio.create_task(pool.getconn(timeout=5))
        await hold.entered.wait()
        task.cancel()
        with bounded(0.0, 0.3), pytest.raises(asyncio.CancelledError):
            await task
        hold.release()
        await await_until(lambda: pool.stats().idle == 1)
        pool._seams = None
        async with pool.connection(timeout=1) as conn:
            await conn.execute("SELECT 1")
        stats = pool.stats()
        assert stats.connections_opened_total == 1 and stats.waiting == 0
        await acheck_pool(pool, admin)


# -- 20. cancelled at the instant of hand-off --------------------------------


async def test_cancelled_at_the_assign_seam_gets_cancelled_and_gives_it_back(
    dsn: str, admin: Any
) -> None:
    """Scenario 20 (psycopg#1275, #1345): a waiter cancelled right after a
    connection was assigned to it, before it woke up, gets `CancelledError`
    (never the connection), and the connection goes back to the pool: the
    next caller gets the same backend."""
    async with small_pool(dsn) as pool:
        held = await pool.getconn()
        pid = held.info.backend_pid
        waiter = asyncio.create_task(pool.getconn(timeout=5))
        await await_until(lambda: pool.stats().waiting == 1)

        def cancel_the_waiter(entry: Entry) -> None:
            assert entry.pid == pid
            waiter.cancel()

        pool._seams = {"assign": cancel_the_waiter}
        await pool.putconn(held)
        pool._seams = None
        with pytest.raises(asyncio.CancelledError):
            await waiter
        stats = pool.stats()
        assert (stats.in_use, stats.idle, stats.waiting) == (0, 1, 0)
        async with pool.connection(timeout=1) as conn:
            assert conn.info.backend_pid == pid
        await acheck_pool(pool, admin)


async def test_hand_off_to_a_cancelled_waiter_passes_to_the_next_one(
    dsn: str, admin: Any
) -> None:
    """Scenario 20: a connection assigned to a waiter cancelled at that
    instant is handed on to the next waiter in line, without waiting for
    another connection to come back."""
    async with small_pool(dsn) as pool:
        held = await pool.getconn()
        pid = held.info.backend_pid
        first = asyncio.create_task(pool.getconn(timeout=5))
        await await_until(lambda: pool.stats().waiting == 1)
        second = asyncio.create_task(pool.getconn(timeout=5))
        await await_until(lambda: pool.stats().waiting == 2)
        assigned = 0

        def cancel_the_first(entry: Entry) -> None:
            nonlocal assigned
            assigned += 1
            if assigned == 1:
                first.cancel()

        pool._seams = {"assign": cancel_the_first}
        await pool.putconn(held)
        with pytest.raises(asyncio.CancelledError):
            await first
        with bounded(0.0, 0.3):
            conn = await second
        pool._seams = None
        assert conn.info.backend_pid == pid and assigned == 2
        await pool.putconn(conn)
        await acheck_pool(pool, admin)


# -- 21. cancelled during validation, rollback, connect ------------------------


async def test_cancelled_during_validation_loses_no_slot(dsn: str, admin: Any) -> None:
    """Scenario 21 (psycopg#1123): a caller cancelled while its connection is
    being validated gets `CancelledError` promptly; that connection is
    returned or closed, never left on loan, and the pool is back at
    `min_size`."""
    async with small_pool(dsn) as pool:
        await pool.wait(5)
        hold = Hold()
        pool._seams = {"validate": hold.hook}
        force_validation(pool)
        task = asyncio.create_task(pool.getconn(timeout=5))
        await hold.entered.wait()
        task.cancel()
        with bounded(0.0, 0.3), pytest.raises(asyncio.CancelledError):
            await task
        pool._seams = None
        hold.release()
        stats = pool.stats()
        assert stats.in_use == 0 and stats.waiting == 0
        await acheck_pool(pool, admin)


async def test_cancel_during_validation_is_not_counted_as_a_failure(
    dsn: str, admin: Any
) -> None:
    """Scenario 21: a cancellation is not a validation failure nor a lost
    connection: the metrics that alert on those stay at zero."""
    async with small_pool(dsn) as pool:
        await pool.wait(5)
        hold = Hold()
        pool._seams = {"validate": hold.hook}
        force_validation(pool)
        task = asyncio.create_task(pool.getconn(timeout=5))
        await hold.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pool._seams = None
        hold.release()
        await acheck_pool(pool, admin)
        stats = pool.stats()
        assert stats.validation_failures_total == 0, stats
        assert stats.connections_lost_total == 0, stats


async def test_cancelled_during_rollback_keeps_the_cancel_and_no_work(
    dsn: str, admin: Any
) -> None:
    """Scenario 21 (psycopg#1208): a caller cancelled while the pool rolls
    back the connection it gave back gets `CancelledError`; the connection is
    closed or returned clean, its work is not committed, no slot is lost."""
    admin.execute("CREATE TABLE t (x int)")
    async with small_pool(dsn) as pool:
        hold = Hold()
        pool._seams = {"rollback": hold.hook}

        async def give_back_in_a_transaction() -> None:
            conn = await pool.getconn()
            await conn.execute("INSERT INTO t VALUES (1)")
            await pool.putconn(conn)

        task = asyncio.create_task(give_back_in_a_transaction())
        await hold.entered.wait()
        task.cancel()
        with bounded(0.0, 0.3), pytest.raises(asyncio.CancelledError):
            await task
        pool._seams = None
        hold.release()
        assert pool.stats().in_use == 0
        async with pool.connection(timeout=3) as conn:
            cur = await conn.execute("SELECT count(*) FROM t")
            assert await cur.fetchone() == (0,)
        await acheck_pool(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 0


async def test_pool_closed_while_a_connect_is_held_closes_the_late_connection(
    dsn: str, admin: Any
) -> None:
    """Scenarios 21 and 22: closing the pool while a connection is being made
    fails the caller waiting for it with `PoolClosed`; the connection, made
    after the close, is closed too: no backend, no task left."""
    pool = small_pool(dsn)
    hold = Hold()
    pool._seams = {"connect": hold.hook}
    await pool.open()
    waiter = asyncio.create_task(pool.getconn(timeout=5))
    await hold.entered.wait()
    closing = asyncio.create_task(pool.close())
    await await_until(lambda: pool._core.closed)
    with pytest.raises(PoolClosed):
        await waiter
    hold.release()
    with bounded(1.0):
        await closing
    await acheck_closed(pool, admin)


async def test_close_is_bounded_when_a_connect_hangs(
    dsn: str, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenarios 21, 22 and N3: a connect that never finishes does not make
    `close()` hang: the connect task is cancelled after the stop timeout and
    the connection it had made is closed."""
    monkeypatch.setattr(pool_async, "_STOP_TIMEOUT", 0.3)
    pool = small_pool(dsn)
    hold = Hold()
    pool._seams = {"connect": hold.hook}
    await pool.open()
    await hold.entered.wait()
    try:
        with bounded(0.3, 1.0):
            await pool.close()
        await acheck_closed(pool, admin)
    finally:
        hold.release()


async def test_wait_for_bounds_a_borrow_held_in_validation(
    dsn: str, admin: Any
) -> None:
    """Scenario 21 (psycopg#1401): `asyncio.wait_for(pool.getconn(), t)`
    ends at `t` even when the borrow is inside the validation step; the
    connection being checked is not lost."""
    async with small_pool(dsn) as pool:
        await pool.wait(5)
        hold = Hold()
        pool._seams = {"validate": hold.hook}
        force_validation(pool)
        with bounded(0.3, 0.3), pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.getconn(timeout=5), 0.3)
        pool._seams = None
        hold.release()
        assert pool.stats().in_use == 0
        await acheck_pool(pool, admin)


async def test_asyncio_timeout_bounds_a_borrow_in_a_hanging_validation_query(
    dsn: str, admin: Any
) -> None:
    """Scenario 21: `asyncio.timeout()` around `pool.connection()` ends the
    borrow on time while the validation query hangs on the server; the hung
    backend is stopped and the pool recovers."""
    admin.execute("CREATE TABLE hang (); INSERT INTO hang DEFAULT VALUES")
    async with small_pool(
        dsn, validation_query=HANGING_CHECK, validation_timeout=5
    ) as pool:
        app = pool.config.application_name
        await pool.wait(5)
        (pid,) = backend_pids(admin, app)
        force_validation(pool)
        with bounded(0.3, 0.3), pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                async with pool.connection(timeout=5):
                    pytest.fail("served a connection whose check hung")
        await await_until(lambda: pid not in backend_pids(admin, app), timeout=3)
        admin.execute("DELETE FROM hang")
        await acheck_pool(pool, admin)


async def test_taskgroup_cancellation_gives_every_connection_back(
    dsn: str, admin: Any
) -> None:
    """Scenario 21: when one task of a TaskGroup fails, the others are
    cancelled wherever they are (holding a transaction, mid-query, queued):
    only the original error comes out, promptly; no work is committed, no
    slot is lost."""
    admin.execute("CREATE TABLE t (x int)")
    async with small_pool(dsn, min_size=3, max_size=3) as pool:
        await pool.wait(5)
        holding = 0

        async def in_transaction() -> None:
            nonlocal holding
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO t VALUES (1)")
                holding += 1
                await asyncio.sleep(10)

        async def mid_query() -> None:
            nonlocal holding
            async with pool.connection() as conn:
                holding += 1
                await conn.execute("SELECT pg_sleep(10)")

        async def queued() -> None:
            async with pool.connection(timeout=10):
                pytest.fail("a queued task was served")

        raised_at = 0.0

        async def failing() -> None:
            nonlocal raised_at
            await await_until(lambda: holding == 3 and pool.stats().waiting == 3)
            await await_until(
                lambda: count(
                    admin,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'"
                    " AND datname = current_database()",
                )
            )
            raised_at = time.monotonic()
            raise ValueError("the failing task")

        with pytest.raises(ExceptionGroup) as info:
            async with asyncio.TaskGroup() as group:
                for work in (in_transaction, in_transaction, mid_query):
                    group.create_task(work())
                for _ in range(3):
                    group.create_task(queued())
                group.create_task(failing())
        assert time.monotonic() - raised_at < 1.0
        assert [type(e) for e in info.value.exceptions] == [ValueError]
        stats = pool.stats()
        assert stats.in_use == 0 and stats.waiting == 0
        await acheck_pool(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 0


# -- 31. event loops -------------------------------------------------------------


def test_pool_created_outside_a_loop_works_once_opened_inside(
    dsn: str, admin: Any
) -> None:
    """Scenario 31 (psycopg#219): an `AsyncPool` built where no event loop
    runs is opened, used and closed normally inside a loop."""
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    pool = small_pool(dsn, min_size=2, max_size=2)

    async def main() -> None:
        await pool.open(wait=True)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        await acheck_pool(pool, admin)
        await pool.close()
        await acheck_closed(pool, admin)

    asyncio.run(main())


async def test_concurrent_opens_start_one_maintenance_task(
    dsn: str, admin: Any
) -> None:
    """Scenario 31 (asyncpg's init race): opening a pool from several tasks at
    once starts one maintenance task and opens `min_size` connections once."""
    pool = small_pool(dsn, min_size=2, max_size=2)
    try:
        await asyncio.gather(*(pool.open(wait=True) for _ in range(5)))
        marker = f"pgwarden {pool.name} maintenance"
        assert [t.get_name() for t in asyncio.all_tasks()].count(marker) == 1
        await acheck_pool(pool, admin)
        assert pool.stats().connections_opened_total == 2
    finally:
        await pool.close()
    await acheck_closed(pool, admin)


async def test_pool_used_from_a_loop_in_another_thread_refuses(
    dsn: str, admin: Any
) -> None:
    """Scenario 31: while its own loop is running a task, a pool used from a
    loop in another thread refuses with an error that names the loop (its
    cheap check of the borrower looks at the thread too)."""
    async with small_pool(dsn) as pool:
        await pool.wait(5)
        errors: list[BaseException] = []

        def elsewhere() -> None:
            async def borrow() -> None:
                await pool.getconn()

            try:
                asyncio.run(borrow())
            except BaseException as ex:
                errors.append(ex)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(10)  # blocking: this task stays the one our loop runs
        (error,) = errors
        assert isinstance(error, PoolClosed), error
        assert "another event loop" in str(error)
        await acheck_pool(pool, admin)


def test_pool_whose_loop_moved_to_another_thread_refuses_this_one(
    dsn: str, admin: Any
) -> None:
    """Scenario 31: a pool opened in a loop that now runs in another thread
    refuses a borrow from this thread's loop, even while its own loop is busy
    with a task (the thread that counts is the one running the loop now)."""
    loop = asyncio.new_event_loop()
    pool = small_pool(dsn)
    loop.run_until_complete(pool.open(wait=True))
    busy, stop = threading.Event(), threading.Event()

    async def hold_the_loop() -> None:
        busy.set()
        stop.wait(10)  # blocking: this task stays the one its loop runs

    thread = threading.Thread(target=loop.run_until_complete, args=(hold_the_loop(),))
    thread.start()
    try:
        assert busy.wait(5)

        async def borrow() -> None:
            await pool.getconn()

        with pytest.raises(PoolClosed, match="another event loop"):
            asyncio.run(borrow())
    finally:
        stop.set()
        thread.join(10)
        loop.run_until_complete(pool.close())
        loop.close()
    assert pool.stats().borrowed_total == 0


def test_pool_closed_in_one_loop_says_so_in_another(dsn: str, admin: Any) -> None:
    """Scenario 31: a pool closed in one event loop, then used from another,
    raises a clear `PoolClosed`, and can't be reopened there."""
    pool = small_pool(dsn)

    async def first() -> None:
        await pool.open(wait=True)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        await pool.close()
        await acheck_closed(pool, admin)

    async def second() -> None:
        with pytest.raises(PoolClosed, match="is closed"):
            await pool.getconn()
        with pytest.raises(PoolClosed, match="can't be reopened"):
            await pool.open()
        await acheck_closed(pool, admin)

    asyncio.run(first())
    asyncio.run(second())


def test_open_pool_used_from_a_new_loop_keeps_working_or_refuses(
    dsn: str, admin: Any
) -> None:
    """Scenario 31: a pool still open when its event loop ended is either
    refused in the next loop with an error that names the loop, or fully
    working there, background maintenance (here: leak detection) included;
    never silently half alive."""
    pool = small_pool(dsn, leak_detection_threshold=0.2)

    async def first() -> None:
        await pool.open(wait=True)

    async def second() -> None:
        try:
            try:
                conn = await pool.getconn(timeout=1)
            except PgwardenError as ex:
                assert "loop" in str(ex), ex
                return
            try:
                await await_until(
                    lambda: pool.stats().leaks_total == 1,
                    timeout=2,
                    message="leak detection running in the new loop",
                )
            finally:
                await pool.putconn(conn)
            await acheck_pool(pool, admin)
        finally:
            await pool.close()
        await acheck_closed(pool, admin)

    asyncio.run(first())
    asyncio.run(second())


# -- the waiters' shared timer --------------------------------------------------


async def test_a_failing_waiter_check_does_not_stop_the_others_timing_out(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # One timer serves every waiter: an error settling one of them must not
    # leave the rest waiting for good.
    async with small_pool(dsn) as pool:
        held = await pool.getconn()
        expire = pool._expire
        failed = []

        def flaky(waiter: Any) -> bool:
            if not failed:
                failed.append(waiter)
                raise RuntimeError("boom")
            return expire(waiter)

        pool._expire = flaky  # type: ignore[method-assign]
        tasks = [asyncio.create_task(pool.getconn(timeout=0.3)) for _ in range(3)]
        t0 = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), timeout=10
        )
        assert all(isinstance(r, PoolTimeout) for r in results), results
        assert time.monotonic() - t0 < 3
        assert "checking a waiter failed" in caplog.text
        await pool.putconn(held)
        await acheck_pool(pool, admin)
