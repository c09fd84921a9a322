# WARNING: generated from test_server_async.py by tools/async_to_sync.py.
# DO NOT CHANGE THIS FILE: change test_server_async.py and run the tool.
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

from pgwarden import Pool, PoolTimeout
from pgwarden.pool._acompat import Event
from pgwarden.pool._core import BACKOFF_CAP, BACKOFF_JITTER, FAST_FAIL_WAIT
from tests._util import wait_until
from tests.faults._common import fault_settings, is_query_error
from tests.faults.invariants import bounded, check_closed, check_pool
from tests.faults.server import ServerControls
from tests.pool._helpers import backend_pids, run_all


def run_blocking(func: Callable[..., Any], *args: Any) -> Any:
    return func(*args)


asleep = time.sleep

# The longest a refill may wait for its next attempt once the server is back.
MAX_BACKOFF = BACKOFF_CAP * (1 + BACKOFF_JITTER)


def query_pid(conn: Any) -> int:
    cur = conn.execute("SELECT pg_backend_pid()")
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


# -- 6. a backend terminated while idle in the pool -----------------------------


def test_idle_backends_terminated_are_replaced_without_errors(
    dsn: str, admin: Any, server: ServerControls
) -> None:
    with Pool(dsn, **fault_settings(min_size=3, max_size=3)) as pool:
        pool.wait(5)
        old = set(backend_pids(admin, pool.config.application_name))
        assert len(old) == 3
        assert set(server.terminate(old)) == old
        # Validation on: every borrower gets a working connection, at once.
        with bounded(1.0):
            conns = [pool.getconn(timeout=1.0) for _ in range(3)]
            pids = {query_pid(conn) for conn in conns}
        assert len(pids) == 3 and not pids & old
        for conn in conns:
            pool.putconn(conn)
        assert pool.stats().connections_lost_total >= 3
        check_pool(pool, admin)
    check_closed(pool, admin)


def test_idle_backend_terminated_without_validation_fails_one_borrower(
    dsn: str, admin: Any, server: ServerControls, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = Pool(dsn, **fault_settings(min_size=1, max_size=1, test_on_borrow=False))
    # Maintenance also reads idle connections' pending input and would replace
    # the dead one first; keep it asleep to see what the borrower alone gets.
    monkeypatch.setattr(pool, "_tick", 3600.0)
    with pool:
        with pool.connection() as conn:
            dead = query_pid(conn)
        server.terminate([dead])
        errors: list[BaseException] = []
        pids: list[int] = []
        for _ in range(3):
            try:
                with bounded(1.0):
                    with pool.connection(timeout=1.0) as conn:
                        pids.append(query_pid(conn))
            except psycopg.OperationalError as ex:
                errors.append(ex)
        # Exactly one borrower saw the dead session; the slot was refilled.
        assert len(errors) == 1 and is_query_error(errors[0]), errors
        assert len(pids) == 2 and dead not in pids
        check_pool(pool, admin)
    check_closed(pool, admin)


# -- 7. a backend terminated while checked out -----------------------------------


def test_backend_terminated_while_checked_out_fails_only_its_borrower(
    dsn: str, admin: Any, server: ServerControls
) -> None:
    admin.execute("CREATE TABLE t (x int)")
    with Pool(dsn, **fault_settings(min_size=1, max_size=1)) as pool:
        with pytest.raises(psycopg.OperationalError) as info:
            with pool.connection() as conn:
                conn.execute("INSERT INTO t VALUES (1)")
                pid = query_pid(conn)
                server.terminate([pid])
                conn.execute("INSERT INTO t VALUES (2)")
        assert is_query_error(info.value), info.value
        # The pool's only slot is free at once: the next borrower is served.
        with bounded(0.5):
            with pool.connection(timeout=0.5) as conn:
                assert query_pid(conn) != pid
        assert admin.execute("SELECT count(*) FROM t").fetchone() == (0,)
        assert pool.stats().connections_lost_total >= 1
        check_pool(pool, admin)
    check_closed(pool, admin)


# -- 8. the server restarts under load --------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_under_load_fails_in_flight_work_then_recovers(
    dsn: str, server: ServerControls, mode: str
) -> None:
    # The embedded server runs with synchronous_commit off: without this, an
    # immediate restart (a crash) may lose the table itself.
    server.admin.execute("SET synchronous_commit = on")
    server.admin.execute("CREATE TABLE t (id int)")
    pool = Pool(dsn, **fault_settings(min_size=2, max_size=4, connection_timeout=2.0))
    ids = itertools.count()
    committed: list[int] = []
    in_flight: list[tuple[int, BaseException]] = []  # failed inside the block
    stop = Event()

    def worker() -> None:
        while not stop.is_set():
            i = next(ids)
            in_block = False
            try:
                with pool.connection() as conn:
                    in_block = True
                    conn.execute("INSERT INTO t VALUES (%s)", [i])
                    conn.execute("SELECT pg_sleep(0.02)")
                    in_block = False
            except psycopg.OperationalError as ex:
                if in_block:
                    in_flight.append((i, ex))
                else:  # no connection in time, or the commit's outcome is unknown
                    asleep(0.01)
            else:
                committed.append(i)

    def restarter() -> None:
        try:
            wait_until(lambda: len(committed) >= 20, timeout=10)
            run_blocking(server.restart, mode)
            mark = len(committed)
            wait_until(lambda: len(committed) >= mark + 20, timeout=10)
        finally:
            stop.set()

    with pool:
        pool.wait(5)
        run_all([worker, worker, worker, worker, restarter])
        # The work in flight failed, each with a clear error from the server or
        # the network, and none of it was committed behind the caller's back.
        assert in_flight
        for _, ex in in_flight:
            assert is_query_error(ex) and str(ex), repr(ex)
        failed = [i for i, _ in in_flight]
        cur = server.admin.execute("SELECT id FROM t WHERE id = ANY(%s)", [failed])
        assert cur.fetchall() == []
        check_pool(pool, server.admin)
    check_closed(pool, server.admin)


# -- 9. the server is down at startup, or for a while ---------------------------


def test_server_down_at_startup_callers_fail_fast_then_pool_fills(
    dsn: str, server: ServerControls
) -> None:
    pool = Pool(dsn, **fault_settings(min_size=2, max_size=2, connection_timeout=10.0))
    with server.stop_for(2.5) as outage:
        pool.open()
        # A caller's own deadline holds...
        with bounded(0.2), pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
        # ...and once the server is known to be down, nobody waits 10 s.
        wait_until(lambda: pool.stats().server_down, timeout=2)
        with bounded(FAST_FAIL_WAIT):
            with pytest.raises(PoolTimeout, match="unreachable") as info:
                pool.getconn()
        assert info.value.last_error
        stats = pool.stats()
        assert stats.size == stats.opening  # failed attempts hold no slot
        wait_until(outage.is_back, timeout=5)
    # The pool fills itself when the server is back, without a borrower.
    wait_until(lambda: pool.stats().idle == 2, timeout=MAX_BACKOFF + 2)
    assert time.monotonic() - outage.back_at < MAX_BACKOFF + 1
    assert not pool.stats().server_down
    check_pool(pool, server.admin)
    pool.close()
    check_closed(pool, server.admin)


def test_server_down_for_a_while_callers_fail_fast_then_it_recovers(
    dsn: str, server: ServerControls
) -> None:
    with Pool(
        dsn, **fault_settings(min_size=2, max_size=2, connection_timeout=10.0)
    ) as pool:
        pool.wait(5)
        failures = 0
        with server.stop_for(3.0) as outage:
            with bounded(0.3), pytest.raises(PoolTimeout):
                pool.getconn(timeout=0.3)
            while not outage.is_back():
                try:
                    with bounded(FAST_FAIL_WAIT):
                        with pool.connection():
                            pass
                except PoolTimeout:
                    failures += 1
        assert failures >= 2
        wait_until(lambda: pool.stats().idle == 2, timeout=MAX_BACKOFF + 2)
        assert time.monotonic() - outage.back_at < MAX_BACKOFF + 1
        assert pool.stats().connection_errors_total >= 2
        check_pool(pool, server.admin)
    check_closed(pool, server.admin)


# -- 10. the server refuses connections: too many (SQLSTATE 53300) ----------------


def test_too_many_connections_is_transient_waiters_keep_their_deadline(
    dsn: str, admin: Any, server: ServerControls
) -> None:
    limited = server.role_connection_limit(2)
    with Pool(
        limited, **fault_settings(min_size=0, max_size=4, connection_timeout=3.0)
    ) as pool:
        first = pool.getconn(timeout=2)
        second = pool.getconn(timeout=2)  # the role's limit is reached
        freed = first.info.backend_pid
        t0 = time.monotonic()
        served: list[int] = []
        timed_out: list[float] = []

        def served_when_a_connection_frees() -> None:
            with bounded(1.2):  # the holder gives one back at 1.2 s
                conn = pool.getconn(timeout=2.5)
            served.append(query_pid(conn))
            wait_until(lambda: timed_out, timeout=5)
            pool.putconn(conn)

        def times_out_on_its_own_deadline() -> None:
            wait_until(lambda: pool.stats().waiting == 1)
            with bounded(2.5), pytest.raises(PoolTimeout) as info:
                pool.getconn(timeout=2.5)
            timed_out.append(time.monotonic() - t0)
            assert timed_out[0] >= 2.4
            assert "too many connections" in str(info.value.last_error)

        def holder() -> None:
            wait_until(lambda: pool.stats().waiting == 2)
            wait_until(lambda: pool.stats().connection_errors_total >= 2)
            asleep(1.2 - (time.monotonic() - t0))  # still working
            assert not pool.stats().server_down  # refused is not down
            pool.putconn(first)

        try:
            run_all(
                [served_when_a_connection_frees, times_out_on_its_own_deadline, holder]
            )
        finally:
            pool.putconn(second)
        assert served == [freed]
        # The refused attempts never took a slot.
        wait_until(lambda: pool.stats().opening == 0)
        assert pool.stats().size == 2
        check_pool(pool, admin)
    check_closed(pool, admin)
