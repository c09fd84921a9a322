"""Server-side faults (scenarios 6-10 of the reliability research) on a real server.

Each test injects one fault, clears it, and ends with the invariant checker.
`test_server.py` (the thread `Pool`) is generated from this file by
`tools/async_to_sync.py`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgwarden import AsyncPool, PoolTimeout
from pgwarden.pool._acompat import AEvent
from pgwarden.pool._core import BACKOFF_CAP, BACKOFF_JITTER, FAST_FAIL_WAIT
from tests._util import await_until
from tests.faults._common import fault_settings, is_query_error
from tests.faults.invariants import acheck_closed, acheck_pool, bounded
from tests.faults.server import ServerControls
from tests.pool._helpers import backend_pids

if True:  # ASYNC
    import asyncio

    async def run_blocking(func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(func, *args)

    async def run_all(funcs: list[Callable[[], Any]]) -> list[Any]:
        """Run the callables concurrently; return their results or raise."""
        return await asyncio.gather(*(f() for f in funcs))

    async def asleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

else:
    from tests.pool._helpers import run_all

    def run_blocking(func: Callable[..., Any], *args: Any) -> Any:
        return func(*args)

    asleep = time.sleep

# The longest a refill may wait for its next attempt once the server is back.
MAX_BACKOFF = BACKOFF_CAP * (1 + BACKOFF_JITTER)


async def query_pid(conn: Any) -> int:
    cur = await conn.execute("SELECT pg_backend_pid()")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# -- 6. a backend terminated while idle in the pool -----------------------------


async def test_idle_backends_terminated_are_replaced_without_errors(
    dsn: str, admin: Any, server: ServerControls
) -> None:
    async with AsyncPool(dsn, **fault_settings(min_size=3, max_size=3)) as pool:
        await pool.wait(5)
        old = set(backend_pids(admin, pool.config.application_name))
        assert len(old) == 3
        assert set(server.terminate(old)) == old
        # Validation on: every borrower gets a working connection, at once.
        with bounded(1.0):
            conns = [await pool.getconn(timeout=1.0) for _ in range(3)]
            pids = {await query_pid(conn) for conn in conns}
        assert len(pids) == 3 and not pids & old
        for conn in conns:
            await pool.putconn(conn)
        assert pool.stats().connections_lost_total >= 3
        await acheck_pool(pool, admin)
    await acheck_closed(pool, admin)


async def test_idle_backend_terminated_without_validation_fails_one_borrower(
    dsn: str, admin: Any, server: ServerControls, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = AsyncPool(
        dsn, **fault_settings(min_size=1, max_size=1, test_on_borrow=False)
    )
    # Maintenance also reads idle connections' pending input and would replace
    # the dead one first; keep it asleep to see what the borrower alone gets.
    monkeypatch.setattr(pool, "_tick", 3600.0)
    async with pool:
        async with pool.connection() as conn:
            dead = await query_pid(conn)
        server.terminate([dead])
        errors: list[BaseException] = []
        pids: list[int] = []
        for _ in range(3):
            try:
                with bounded(1.0):
                    async with pool.connection(timeout=1.0) as conn:
                        pids.append(await query_pid(conn))
            except psycopg.OperationalError as ex:
                errors.append(ex)
        # Exactly one borrower saw the dead session; the slot was refilled.
        assert len(errors) == 1 and is_query_error(errors[0]), errors
        assert len(pids) == 2 and dead not in pids
        await acheck_pool(pool, admin)
    await acheck_closed(pool, admin)


# -- 7. a backend terminated while checked out -----------------------------------


async def test_backend_terminated_while_checked_out_fails_only_its_borrower(
    dsn: str, admin: Any, server: ServerControls
) -> None:
    admin.execute("CREATE TABLE t (x int)")
    async with AsyncPool(dsn, **fault_settings(min_size=1, max_size=1)) as pool:
        with pytest.raises(psycopg.OperationalError) as info:
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO t VALUES (1)")
                pid = await query_pid(conn)
                server.terminate([pid])
                await conn.execute("INSERT INTO t VALUES (2)")
        assert is_query_error(info.value), info.value
        # The pool's only slot is free at once: the next borrower is served.
        with bounded(0.5):
            async with pool.connection(timeout=0.5) as conn:
                assert await query_pid(conn) != pid
        assert admin.execute("SELECT count(*) FROM t").fetchone() == (0,)
        assert pool.stats().connections_lost_total >= 1
        await acheck_pool(pool, admin)
    await acheck_closed(pool, admin)


# -- 8. the server restarts under load --------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_under_load_fails_in_flight_work_then_recovers(
    dsn: str, server: ServerControls, mode: str
) -> None:
    # The embedded server runs with synchronous_commit off: without this, an
    # immediate restart (a crash) may lose the table itself.
    server.admin.execute("SET synchronous_commit = on")
    server.admin.execute("CREATE TABLE t (id int)")
    pool = AsyncPool(
        dsn, **fault_settings(min_size=2, max_size=4, connection_timeout=2.0)
    )
    ids = itertools.count()
    committed: list[int] = []
    in_flight: list[tuple[int, BaseException]] = []  # failed inside the block
    stop = AEvent()

    async def worker() -> None:
        while not stop.is_set():
            i = next(ids)
            in_block = False
            try:
                async with pool.connection() as conn:
                    in_block = True
                    await conn.execute("INSERT INTO t VALUES (%s)", [i])
                    await conn.execute("SELECT pg_sleep(0.02)")
                    in_block = False
            except psycopg.OperationalError as ex:
                if in_block:
                    in_flight.append((i, ex))
                else:  # no connection in time, or the commit's outcome is unknown
                    await asleep(0.01)
            else:
                committed.append(i)

    async def restarter() -> None:
        try:
            await await_until(lambda: len(committed) >= 20, timeout=10)
            await run_blocking(server.restart, mode)
            mark = len(committed)
            await await_until(lambda: len(committed) >= mark + 20, timeout=10)
        finally:
            stop.set()

    async with pool:
        await pool.wait(5)
        await run_all([worker, worker, worker, worker, restarter])
        # The work in flight failed, each with a clear error from the server or
        # the network, and none of it was committed behind the caller's back.
        assert in_flight
        for _, ex in in_flight:
            assert is_query_error(ex) and str(ex), repr(ex)
        failed = [i for i, _ in in_flight]
        cur = server.admin.execute("SELECT id FROM t WHERE id = ANY(%s)", [failed])
        assert cur.fetchall() == []
        await acheck_pool(pool, server.admin)
    await acheck_closed(pool, server.admin)


# -- 9. the server is down at startup, or for a while ---------------------------


async def test_server_down_at_startup_callers_fail_fast_then_pool_fills(
    dsn: str, server: ServerControls
) -> None:
    pool = AsyncPool(
        dsn, **fault_settings(min_size=2, max_size=2, connection_timeout=10.0)
    )
    with server.stop_for(2.5) as outage:
        await pool.open()
        # A caller's own deadline holds...
        with bounded(0.2), pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.2)
        # ...and once the server is known to be down, nobody waits 10 s.
        await await_until(lambda: pool.stats().server_down, timeout=2)
        with bounded(FAST_FAIL_WAIT):
            with pytest.raises(PoolTimeout, match="unreachable") as info:
                await pool.getconn()
        assert info.value.last_error
        stats = pool.stats()
        assert stats.size == stats.opening  # failed attempts hold no slot
        await await_until(outage.is_back, timeout=5)
    # The pool fills itself when the server is back, without a borrower.
    await await_until(lambda: pool.stats().idle == 2, timeout=MAX_BACKOFF + 2)
    assert time.monotonic() - outage.back_at < MAX_BACKOFF + 1
    assert not pool.stats().server_down
    await acheck_pool(pool, server.admin)
    await pool.close()
    await acheck_closed(pool, server.admin)


async def test_server_down_for_a_while_callers_fail_fast_then_it_recovers(
    dsn: str, server: ServerControls
) -> None:
    async with AsyncPool(
        dsn, **fault_settings(min_size=2, max_size=2, connection_timeout=10.0)
    ) as pool:
        await pool.wait(5)
        failures = 0
        with server.stop_for(3.0) as outage:
            with bounded(0.3), pytest.raises(PoolTimeout):
                await pool.getconn(timeout=0.3)
            while not outage.is_back():
                try:
                    with bounded(FAST_FAIL_WAIT):
                        async with pool.connection():
                            pass
                except PoolTimeout:
                    failures += 1
        assert failures >= 2
        await await_until(lambda: pool.stats().idle == 2, timeout=MAX_BACKOFF + 2)
        assert time.monotonic() - outage.back_at < MAX_BACKOFF + 1
        assert pool.stats().connection_errors_total >= 2
        await acheck_pool(pool, server.admin)
    await acheck_closed(pool, server.admin)


# -- 10. the server refuses connections: too many (SQLSTATE 53300) ----------------


async def test_too_many_connections_is_transient_waiters_keep_their_deadline(
    dsn: str, admin: Any, server: ServerControls
) -> None:
    limited = server.role_connection_limit(2)
    async with AsyncPool(
        limited, **fault_settings(min_size=0, max_size=4, connection_timeout=3.0)
    ) as pool:
        first = await pool.getconn(timeout=2)
        second = await pool.getconn(timeout=2)  # the role's limit is reached
        freed = first.info.backend_pid
        t0 = time.monotonic()
        served: list[int] = []
        timed_out: list[float] = []

        async def served_when_a_connection_frees() -> None:
            with bounded(1.2):  # the holder gives one back at 1.2 s
                conn = await pool.getconn(timeout=2.5)
            served.append(await query_pid(conn))
            await await_until(lambda: timed_out, timeout=5)
            await pool.putconn(conn)

        async def times_out_on_its_own_deadline() -> None:
            await await_until(lambda: pool.stats().waiting == 1)
            with bounded(2.5), pytest.raises(PoolTimeout) as info:
                await pool.getconn(timeout=2.5)
            timed_out.append(time.monotonic() - t0)
            assert timed_out[0] >= 2.4
            assert "too many connections" in str(info.value.last_error)

        async def holder() -> None:
            await await_until(lambda: pool.stats().waiting == 2)
            await await_until(lambda: pool.stats().connection_errors_total >= 2)
            await asleep(1.2 - (time.monotonic() - t0))  # still working
            assert not pool.stats().server_down  # refused is not down
            await pool.putconn(first)

        try:
            await run_all(
                [served_when_a_connection_frees, times_out_on_its_own_deadline, holder]
            )
        finally:
            await pool.putconn(second)
        assert served == [freed]
        # The refused attempts never took a slot.
        await await_until(lambda: pool.stats().opening == 0)
        assert pool.stats().size == 2
        await acheck_pool(pool, admin)
    await acheck_closed(pool, admin)
