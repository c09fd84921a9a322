# WARNING: generated from test_network_async.py by tools/async_to_sync.py.
# DO NOT CHANGE THIS FILE: change test_network_async.py and run the tool.
"""Network faults between the pool and the server (scenarios 11-13 of the
reliability research, plus connections cut while idle or on loan, and latency).

The pool reaches the server through the `proxy` fixture (`tests/faults/proxy.py`),
which blackholes, closes, deafens or slows its connections on demand. Each test
clears its fault and ends with the invariant checker. `test_network.py` (the
thread `Pool`) is generated from this file by `tools/async_to_sync.py`.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from pgwarden import Pool, PoolTimeout, QueryTimeout
from pgwarden.pool._core import (
    ALIVE_BYPASS_WINDOW,
    BACKOFF_INITIAL,
    BACKOFF_JITTER,
)
from tests._util import wait_until
from tests.faults._common import fault_settings, is_query_error
from tests.faults.invariants import bounded, check_closed, check_pool
from tests.faults.proxy import Proxy
from tests.faults.server import ServerControls
from tests.pool._helpers import backend_pids, run_all

asleep = time.sleep


# The longest wait before the next connect attempt after one failure.
FIRST_BACKOFF_MAX = BACKOFF_INITIAL * (1 + BACKOFF_JITTER)


def query_pid(conn: Any) -> int:
    cur = conn.execute("SELECT pg_backend_pid()")
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def pool_pids(pool: Pool) -> set[int]:
    return {c.pid for c in pool.describe()}


# -- 11. blackhole: the network drops everything, sockets stay open ---------------


def test_blackhole_while_idle_the_borrow_is_bounded_then_recovers(
    dsn: str, admin: Any, proxy: Proxy
) -> None:
    with Pool(proxy.dsn(dsn), **fault_settings(min_size=2, max_size=2)) as pool:
        pool.wait(5)
        old = pool_pids(pool)
        # Idle past the bypass window: a borrow now proves the connection
        # with the validation query, which is what meets the blackhole.
        asleep(ALIVE_BYPASS_WINDOW + 0.1)
        proxy.blackhole()
        with bounded(1.0), pytest.raises(PoolTimeout):
            pool.getconn(timeout=1.0)
        # Both connections failed validation (bounded by validation_timeout).
        wait_until(lambda: pool.stats().validation_failures_total >= 2)
        proxy.pass_()
        check_pool(pool, admin)
        assert not pool_pids(pool) & old
    check_closed(pool, admin)


def test_blackhole_while_checked_out_query_timeout_bounds_the_query(
    dsn: str, admin: Any, proxy: Proxy
) -> None:
    with Pool(
        proxy.dsn(dsn), **fault_settings(min_size=1, max_size=2, query_timeout=0.5)
    ) as pool:
        with bounded(0.5), pytest.raises(QueryTimeout):
            with pool.connection() as conn:
                pid = query_pid(conn)
                proxy.blackhole()
                conn.execute("SELECT 1")
        # The stuck connection was discarded and its slot given back.
        assert pool.stats().in_use == 0 and pid not in pool_pids(pool)
        proxy.pass_()
        check_pool(pool, admin)
    check_closed(pool, admin)


def test_blackhole_while_connecting_callers_keep_their_deadline(
    dsn: str, admin: Any, proxy: Proxy
) -> None:
    pool = Pool(proxy.dsn(dsn), **fault_settings(min_size=0, max_size=2))
    proxy.blackhole()
    with pool:
        with bounded(0.5), pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.5)
        # The connect attempt is abandoned at its own timeout, not left hanging.
        wait_until(lambda: pool.stats().opening == 0, timeout=4)
        stats = pool.stats()
        assert stats.size == 0 and stats.connection_errors_total >= 1
        assert "connection timeout expired" in (stats.last_error or "")
        proxy.pass_()
        # Past the backoff that failure started (a caller arriving during it
        # is the next test), the next borrower is served at once.
        asleep(FIRST_BACKOFF_MAX)
        with bounded(0.2):
            with pool.connection(timeout=1.0) as conn:
                conn.execute("SELECT 1")
        check_pool(pool, admin)
    check_closed(pool, admin)


def test_caller_arriving_during_the_backoff_is_served_when_it_ends(
    dsn: str, admin: Any, proxy: Proxy
) -> None:
    pool = Pool(proxy.dsn(dsn), **fault_settings(min_size=0, max_size=2))
    proxy.blackhole()
    with pool:
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
        wait_until(lambda: pool.stats().opening == 0, timeout=4)
        proxy.pass_()
        # Arrive inside the first backoff (at least 80 ms), once the pool's
        # maintenance has taken note of the failure.
        asleep(0.05)
        with bounded(FIRST_BACKOFF_MAX, margin=0.3):
            with pool.connection(timeout=1.0) as conn:
                conn.execute("SELECT 1")
        check_pool(pool, admin)
    check_closed(pool, admin)


# -- 12. connectivity lost while a connection is being given back -----------------


@pytest.mark.parametrize("fault", ["blackhole", "reset"])
def test_connectivity_lost_while_giving_back_is_bounded_and_frees_the_slot(
    dsn: str, admin: Any, proxy: Proxy, fault: str
) -> None:
    admin.execute("CREATE TABLE t (x int)")
    with Pool(proxy.dsn(dsn), **fault_settings(min_size=1, max_size=1)) as pool:
        # The rollback on the way back is bounded by validation_timeout.
        with bounded(pool.config.validation_timeout):
            with pytest.raises(ZeroDivisionError):
                with pool.connection() as conn:
                    pid = query_pid(conn)
                    conn.execute("INSERT INTO t VALUES (1)")
                    if fault == "blackhole":
                        proxy.blackhole()
                    else:
                        proxy.close_all(rst=True)
                    1 / 0  # noqa: B018
        assert pool.stats().in_use == 0 and pid not in pool_pids(pool)
        proxy.pass_()
        wait_until(lambda: pid not in backend_pids(admin, None))
        assert admin.execute("SELECT count(*) FROM t").fetchone() == (0,)
        check_pool(pool, admin)
    check_closed(pool, admin)


def test_connectivity_lost_during_the_commit_on_exit_is_bounded(
    dsn: str, admin: Any, proxy: Proxy
) -> None:
    with Pool(
        proxy.dsn(dsn), **fault_settings(min_size=1, max_size=1, query_timeout=0.5)
    ) as pool:
        # The caller learns the commit's outcome is unknown, within query_timeout.
        with bounded(0.5), pytest.raises(QueryTimeout):
            with pool.connection() as conn:
                pid = query_pid(conn)
                conn.execute("SELECT 1")  # a transaction to commit
                proxy.blackhole()
        assert pool.stats().in_use == 0 and pid not in pool_pids(pool)
        proxy.pass_()
        check_pool(pool, admin)
    check_closed(pool, admin)


# -- 13. connect timeout: a deaf listener, a slow handshake ------------------------


def test_deaf_listener_the_deadline_wins_and_the_late_connection_goes_idle(
    dsn: str, admin: Any, proxy: Proxy
) -> None:
    pool = Pool(
        proxy.dsn(dsn),
        **fault_settings(min_size=0, max_size=2, connection_timeout=2.0),
    )
    proxy.deaf()
    with pool:
        with bounded(0.5), pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.5)
        assert pool.stats().opening == 1  # the attempt still hangs
        proxy.pass_()
        # It completes after its caller left: the connection goes idle.
        wait_until(lambda: pool.stats().idle == 1, timeout=3)
        assert pool.stats().borrowed_total == 0
        (late,) = pool_pids(pool)
        with bounded(0.5):
            with pool.connection(timeout=0.5) as conn:
                assert query_pid(conn) == late
        check_pool(pool, admin)
    check_closed(pool, admin)


def test_slow_handshake_the_deadline_wins_and_the_late_connection_goes_idle(
    dsn: str, admin: Any, server: ServerControls
) -> None:
    pool = Pool(dsn, **fault_settings(min_size=0, max_size=2, connection_timeout=3.0))
    with pool:
        with server.pre_auth_delay(1):
            with bounded(0.3), pytest.raises(PoolTimeout):
                pool.getconn(timeout=0.3)
            wait_until(lambda: pool.stats().idle == 1, timeout=3)
        assert pool.stats().borrowed_total == 0
        (late,) = pool_pids(pool)
        with bounded(0.5):
            with pool.connection(timeout=0.5) as conn:
                assert query_pid(conn) == late
        check_pool(pool, admin)
    check_closed(pool, admin)


# -- connections cut (FIN or RST) while idle or on loan ----------------------------


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_connections_cut_while_idle_are_replaced_without_errors(
    dsn: str, admin: Any, proxy: Proxy, rst: bool
) -> None:
    with Pool(proxy.dsn(dsn), **fault_settings(min_size=2, max_size=2)) as pool:
        pool.wait(5)
        old = pool_pids(pool)
        proxy.close_all(rst=rst)
        proxy.pass_()
        with bounded(1.0):
            conns = [pool.getconn(timeout=1.0) for _ in range(2)]
            pids = {query_pid(conn) for conn in conns}
        assert len(pids) == 2 and not pids & old
        for conn in conns:
            pool.putconn(conn)
        assert pool.stats().connections_lost_total >= 2
        check_pool(pool, admin)
    check_closed(pool, admin)


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_connection_cut_while_checked_out_fails_only_its_borrower(
    dsn: str, admin: Any, proxy: Proxy, rst: bool
) -> None:
    with Pool(proxy.dsn(dsn), **fault_settings(min_size=2, max_size=2)) as pool:
        pool.wait(5)
        with bounded(0.5), pytest.raises(psycopg.OperationalError) as info:
            with pool.connection() as conn:
                pid = query_pid(conn)
                proxy.close_all(rst=rst)
                proxy.pass_()
                conn.execute("SELECT 1")
        assert is_query_error(info.value), info.value
        # The other connection was cut too, but nobody else sees an error.
        with bounded(1.0):
            with pool.connection(timeout=1.0) as conn:
                assert query_pid(conn) != pid
        check_pool(pool, admin)
    check_closed(pool, admin)


# -- latency -------------------------------------------------------------------------


def test_latency_everything_works_just_slower(
    dsn: str, admin: Any, proxy: Proxy
) -> None:
    delay = 0.05
    with Pool(proxy.dsn(dsn), **fault_settings(min_size=2, max_size=3)) as pool:
        pool.wait(5)
        proxy.latency(delay)
        durations: list[float] = []

        def worker() -> None:
            for _ in range(3):
                t0 = time.monotonic()
                with pool.connection(timeout=2.0) as conn:
                    conn.execute("SELECT 1")
                durations.append(time.monotonic() - t0)

        run_all([worker, worker, worker, worker])
        # Each block is at least a query and a commit: two round trips.
        assert len(durations) == 12 and min(durations) >= 4 * delay
        assert pool.stats().timeouts_total == 0
        proxy.pass_()
        check_pool(pool, admin)
    check_closed(pool, admin)
