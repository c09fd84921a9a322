# WARNING: generated from test_lifecycle_async.py by tools/async_to_sync.py.
# DO NOT CHANGE THIS FILE: change test_lifecycle_async.py and run the tool.
"""Lifecycle and capacity faults, against the real server, for `Pool`.

`test_lifecycle.py` (the same scenarios for `Pool`) is generated from this file
by `tools/async_to_sync.py`. Scenario numbers are those of the reliability
research (section 3): 1-5 a connection given back in a bad state, 14-18
capacity and waiting, 22-27 lifecycle, 30 stress, 32 configuration, 33
credentials. Every test that runs a pool ends with the invariant checker
(`check_pool`, and `check_closed` when it closes the pool).

Not here: scenario 28 (a `configure`/`setup` hook that fails on a new
connection) does not apply, since pgwarden has no such hook; the asyncio-only
scenarios (cancellation, event loops) are in `test_cancel_async_only.py`; fork
safety (29) is in `tests/pool/test_fork.py`.

Seams (`pool._seams`) freeze the pool at a hand-off point: a hook that returns
an awaitable holds an `Pool` there until it completes; a `Pool` hook
simply blocks its thread.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import random
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.types import TypeInfo
from psycopg.types.string import TextLoader

from pgwarden import (
    ConfigError,
    ConnectionReturned,
    Pool,
    PoolClosed,
    PoolConfig,
    PoolOverloaded,
    PoolTimeout,
)
from pgwarden.pool import _core
from pgwarden.pool._acompat import Event
from pgwarden.pool._core import Entry
from pgwarden.pool.connection import PooledConnection
from tests._util import wait_until
from tests.faults.invariants import bounded, check_closed, check_pool
from tests.pool._helpers import backend_pids, free_port, run_all, unique_app

IS_ASYNC = False


def run_settled(funcs: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables in threads; return each result or exception."""
    results: list[Any] = [None] * len(funcs)

    def run(i: int) -> None:
        try:
            results[i] = funcs[i]()
        except BaseException as ex:
            results[i] = ex

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(funcs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


asleep = time.sleep


def pause(seconds: float) -> Any:
    """For a seam hook: make the pool spend `seconds` at that point."""
    time.sleep(seconds)


def start(func: Callable[[], Any]) -> Callable[[float], Any]:
    """Run `func()` concurrently with the test (in a thread); return a
    function that waits up to `timeout` s for its outcome: what it
    returned or raised (AssertionError if it is still running)."""
    result: list[Any] = [None]

    def run() -> None:
        try:
            result[0] = func()
        except BaseException as ex:
            result[0] = ex

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def outcome(timeout: float) -> Any:
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError(f"still running after {timeout} s")
        return result[0]

    return outcome


class Gate:
    """A seam hook that holds the pool at its hand-off point until opened
    (at most 10 s)."""

    def __init__(self) -> None:
        self.entered = 0
        self._open = Event()

    def hook(self, entry: Entry) -> Any:
        self.entered += 1
        return self._open.wait_timeout(10)

    def open(self) -> None:
        self._open.set()


INTRANS = TransactionStatus.INTRANS
IDLE = TransactionStatus.IDLE


def small_pool(dsn: str, **kwargs: Any) -> Pool:
    """A pool with test-sized timeouts and its own application_name."""
    settings: dict[str, Any] = {
        "min_size": 1,
        "max_size": 2,
        "connection_timeout": 3.0,
        "query_timeout": 5.0,
        "application_name": unique_app(),
    }
    settings.update(kwargs)
    return Pool(dsn, **settings)


def query_pid(conn: Any) -> int:
    cur = conn.execute("SELECT pg_backend_pid()")
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def logged(caplog: pytest.LogCaptureFixture, text: str, level: int) -> list[str]:
    """Messages of pgwarden's records at `level` or above that contain `text`."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("pgwarden")
        and r.levelno >= level
        and text in r.getMessage()
    ]


def here(text: str) -> str:
    """`text` with this file's generated twin named as this file."""
    return text.replace("test_lifecycle.py", "test_lifecycle_async.py")


def count(admin: Any, query: str) -> int:
    row = admin.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def force_validation(pool: Pool) -> None:
    """Make the next borrow run the validation query on the idle connections."""
    with pool._lock:
        pool._core.suspect_before = time.monotonic()


# -- A. returned in a bad state (scenarios 1-5) -------------------------------


def test_open_transaction_given_back_is_rolled_back_on_the_same_backend(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 1: work left uncommitted by `putconn()` is rolled back, invisible
    to the next borrower, the same backend is reused, and one warning names the
    backend and where it was borrowed."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    admin.execute("CREATE TABLE t (x int)")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        line = sys._getframe().f_lineno + 1
        conn = pool.getconn()
        pid = query_pid(conn)
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("CREATE TABLE made_inside (x int)")
        assert conn.info.transaction_status == INTRANS
        pool.putconn(conn)

        with pool.connection() as conn:
            assert conn.info.transaction_status == IDLE
            assert query_pid(conn) == pid
            cur = conn.execute(
                "SELECT to_regclass('made_inside') IS NULL, (SELECT count(*) FROM t)"
            )
            assert cur.fetchone() == (True, 0)
        (msg,) = logged(caplog, "inside a transaction", logging.WARNING)
        assert f"backend pid {pid}" in msg
        assert f"test_lifecycle_async.py:{line} in test_open_transaction" in here(msg)
        check_pool(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 0


def test_failed_transaction_given_back_is_rolled_back_and_reused(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 2: a connection given back in a failed transaction (INERROR) is
    rolled back and reused: the next borrower gets the same backend, IDLE, and
    one warning names the backend."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        pid = query_pid(conn)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        assert conn.info.transaction_status == TransactionStatus.INERROR
        pool.putconn(conn)

        with pool.connection() as conn:
            assert conn.info.transaction_status == IDLE
            assert query_pid(conn) == pid
        (msg,) = logged(caplog, f"backend pid {pid}", logging.WARNING)
        assert "rolling it back" in msg
        assert pool.stats().connections_closed_total == 0
        check_pool(pool, admin)


def test_warning_for_a_failed_transaction_says_it_had_failed(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 2: the warning names the state the connection came back in, so
    an operator can tell an unhandled error from a forgotten commit."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        pid = query_pid(conn)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        pool.putconn(conn)
        check_pool(pool, admin)
    (msg,) = logged(caplog, f"backend pid {pid}", logging.WARNING)
    state = re.sub(r"\(acquired at [^)]*\)", "", msg)  # the site names this test
    assert re.search(r"INERROR|failed|aborted|error", state), msg


def test_connection_given_back_mid_copy_is_closed_and_replaced(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 3: a connection given back in the middle of a `COPY ... TO
    STDOUT` (ACTIVE) is closed, never reused: its backend goes away, the next
    borrower gets a new one, the pool's size is unchanged."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        app = pool.config.application_name
        conn = pool.getconn()
        pid = query_pid(conn)
        # Start the COPY the way psycopg's own test does: the server streams,
        # nobody reads.
        copy = b"COPY (SELECT generate_series(1, 1000000)) TO STDOUT"
        conn.pgconn.send_query(copy)
        assert conn.info.transaction_status == TransactionStatus.ACTIVE
        pool.putconn(conn)

        wait_until(lambda: pid not in backend_pids(admin, app))
        with pool.connection(timeout=3) as conn:
            assert query_pid(conn) != pid
        (msg,) = logged(caplog, "during a query", logging.WARNING)
        assert f"backend pid {pid}" in msg
        stats = pool.stats()
        assert stats.size == 1 and stats.connection_errors_total == 0
        check_pool(pool, admin)


def test_connection_given_back_during_a_running_query_stops_that_query(
    dsn: str, admin: Any
) -> None:
    """Scenario 3: giving back a connection whose query still runs elsewhere
    ends that query promptly, on the client (the caller gets an error, not a
    hang) and on the server (the backend stops running it), and the
    replacement opens without a connection error."""
    with small_pool(
        dsn, min_size=1, max_size=1, query_timeout=1.5, statement_timeout=2
    ) as pool:
        app = pool.config.application_name
        conn = pool.getconn()
        pid = query_pid(conn)

        def query() -> Any:
            return conn.execute("SELECT pg_sleep(10)")

        running = start(query)
        try:
            wait_until(
                lambda: count(
                    admin,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'"
                    " AND datname = current_database()",
                )
            )
            pool.putconn(conn)
            outcome = running(1.0)
            assert isinstance(outcome, psycopg.Error), repr(outcome)
            wait_until(lambda: pid not in backend_pids(admin, app), timeout=1.0)
            with pool.connection(timeout=3) as conn:
                assert query_pid(conn) != pid
            assert pool.stats().connection_errors_total == 0
            check_pool(pool, admin)
        finally:
            try:
                running(5)
            except AssertionError:
                pass


def test_rollback_failure_on_give_back_closes_the_connection_quietly(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 4: when the rollback of a connection given back fails (its
    backend was terminated at that instant), the borrower who already left gets
    no exception, the connection is closed and replaced (size unchanged), the
    error is logged once with its cause, and nothing is committed."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    admin.execute("CREATE TABLE t (x int)")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        pid = query_pid(conn)
        conn.execute("INSERT INTO t VALUES (1)")

        def terminate(entry: Entry) -> None:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", [entry.pid])

        pool._seams = {"rollback": terminate}
        pool.putconn(conn)  # no exception for the borrower
        pool._seams = None

        with pool.connection(timeout=3) as conn:
            assert query_pid(conn) != pid
        (msg,) = logged(caplog, "resetting a connection", logging.WARNING)
        assert "closing it" in msg and "terminat" in msg.lower()
        assert pool.stats().size == 1
        check_pool(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 0


def test_rollback_error_after_a_failed_block_leaves_the_block_error_alone(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenarios 4 and 5: when the block raised and the rollback then fails
    too, the caller gets its own exception, unchanged; the connection is closed
    and the rollback error logged once."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    admin.execute("CREATE TABLE t (x int)")

    class Boom(Exception):
        pass

    def broken_rollback(entry: Entry) -> None:
        raise psycopg.OperationalError("injected rollback failure")

    with small_pool(dsn, min_size=1, max_size=1) as pool:
        boom = Boom()
        pool._seams = {"rollback": broken_rollback}
        with pytest.raises(Boom) as info:
            with pool.connection() as conn:
                pid = query_pid(conn)
                conn.execute("INSERT INTO t VALUES (1)")
                raise boom
        pool._seams = None
        assert info.value is boom
        with pool.connection(timeout=3) as conn:
            assert query_pid(conn) != pid
        (msg,) = logged(caplog, "resetting a connection", logging.WARNING)
        assert "injected rollback failure" in msg
        check_pool(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 0


@pytest.mark.parametrize("failed_statement", [False, True])
def test_block_error_propagates_unchanged_and_its_work_is_rolled_back(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture, failed_statement: bool
) -> None:
    """Scenario 5: an exception raised in the block (after a statement that
    worked, or one that failed) reaches the caller unchanged, its work is rolled
    back, and the same connection goes back to the pool without a warning."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    admin.execute("CREATE TABLE t (x int)")

    class Boom(Exception):
        pass

    with small_pool(dsn, min_size=1, max_size=1) as pool:
        boom = Boom("from the block")
        with pytest.raises(Boom) as info:
            with pool.connection() as conn:
                pid = query_pid(conn)
                conn.execute("INSERT INTO t VALUES (1)")
                if failed_statement:
                    with pytest.raises(psycopg.errors.DivisionByZero):
                        conn.execute("SELECT 1 / 0")
                raise boom
        assert info.value is boom and str(info.value) == "from the block"
        assert pool.stats().size == 1 and pool.stats().idle == 1
        with pool.connection() as conn:
            assert conn.info.transaction_status == IDLE
            assert query_pid(conn) == pid
        assert not logged(caplog, "", logging.WARNING)
        check_pool(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 0


# -- D. capacity and waiting (scenarios 14-18) --------------------------------

# A validation query that sleeps 10 s while the table `hang` has a row.
HANGING_CHECK = (
    "SELECT pg_sleep(CASE WHEN EXISTS (SELECT FROM hang) THEN 10 ELSE 0 END)"
)
# A query that fails (division by zero) while the table `broken` has a row.
# (Not `CASE ... THEN 1 / 0`: the planner folds that constant and always fails.)
FAILING_CHECK = "SELECT 1 / (1 - (SELECT count(*) FROM broken))"


def test_hanging_validation_is_cut_at_validation_timeout(dsn: str, admin: Any) -> None:
    """Scenario 14: a validation query that hangs is stopped at
    `validation_timeout`; the borrower gets another connection well before its
    own deadline, and the hung backend does not stay behind."""
    admin.execute("CREATE TABLE hang (); INSERT INTO hang DEFAULT VALUES")
    with small_pool(
        dsn,
        min_size=1,
        max_size=1,
        validation_query=HANGING_CHECK,
        validation_timeout=0.2,
    ) as pool:
        app = pool.config.application_name
        pool.wait(5)
        (pid,) = backend_pids(admin, app)
        force_validation(pool)
        with bounded(1.0):
            conn = pool.getconn(timeout=3)
        assert query_pid(conn) != pid
        pool.putconn(conn)
        assert pool.stats().validation_failures_total == 1
        wait_until(lambda: pid not in backend_pids(admin, app), timeout=3)
        admin.execute("DELETE FROM hang")
        check_pool(pool, admin)


def test_hanging_validation_is_bounded_by_the_borrow_deadline(
    dsn: str, admin: Any
) -> None:
    """Scenarios 14 and N3: a borrow whose deadline is shorter than
    `validation_timeout` still ends by its own deadline (`PoolTimeout`), and
    the connection whose check hung is discarded, its backend gone."""
    admin.execute("CREATE TABLE hang (); INSERT INTO hang DEFAULT VALUES")
    with small_pool(
        dsn,
        min_size=1,
        max_size=1,
        validation_query=HANGING_CHECK,
        validation_timeout=5,
    ) as pool:
        app = pool.config.application_name
        pool.wait(5)
        (pid,) = backend_pids(admin, app)
        force_validation(pool)
        with bounded(0.3), pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.3)
        wait_until(lambda: pid not in backend_pids(admin, app), timeout=3)
        admin.execute("DELETE FROM hang")
        check_pool(pool, admin)


def test_failing_validation_backs_off_instead_of_spinning(
    dsn: str, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario 14 (psycopg#709): while every validation fails, a borrow gives
    up by its deadline and the retries are spaced out (backoff), not a busy
    loop of connect-check-close against the server."""
    monkeypatch.setattr(_core, "ALIVE_BYPASS_WINDOW", -1.0)  # check every borrow
    admin.execute("CREATE TABLE broken (); INSERT INTO broken DEFAULT VALUES")
    with small_pool(
        dsn, min_size=1, max_size=1, validation_query=FAILING_CHECK
    ) as pool:
        pool.wait(5)
        opened = pool.stats().connections_opened_total
        with bounded(1.0), pytest.raises(PoolTimeout):
            pool.getconn(timeout=1.0)
        attempts = pool.stats().connections_opened_total - opened
        admin.execute("DELETE FROM broken")
        check_pool(pool, admin)
    # Backoff 0.1, 0.2, 0.4 s...: a handful of attempts in a second.
    assert attempts <= 10, f"{attempts} connections opened in 1 s"


def test_timeout_after_failed_validations_tells_the_real_wait(
    dsn: str, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario 14: the `PoolTimeout` a caller gets after its borrows kept
    failing validation reports how long the caller waited and why."""
    monkeypatch.setattr(_core, "ALIVE_BYPASS_WINDOW", -1.0)  # check every borrow
    admin.execute("CREATE TABLE broken (); INSERT INTO broken DEFAULT VALUES")
    with small_pool(
        dsn, min_size=1, max_size=1, validation_query=FAILING_CHECK
    ) as pool:
        pool.wait(5)
        with pytest.raises(PoolTimeout) as info:
            pool.getconn(timeout=0.5)
        admin.execute("DELETE FROM broken")
        check_pool(pool, admin)
    msg = str(info.value)
    waited = re.search(r"after ([0-9.]+) s", msg)
    assert waited and float(waited[1]) >= 0.45, msg
    assert "validation" in msg, msg


def test_validation_leaving_a_transaction_open_counts_as_failed(
    dsn: str, admin: Any
) -> None:
    """Scenario 14 (psycopg#1014): a validation query that leaves the
    connection inside a transaction fails the check: that connection is
    discarded, and the borrower gets a clean (IDLE) one."""
    with small_pool(
        dsn, min_size=1, max_size=1, validation_query="BEGIN; SELECT 1"
    ) as pool:
        app = pool.config.application_name
        pool.wait(5)
        (pid,) = backend_pids(admin, app)
        force_validation(pool)
        with pool.connection(timeout=3) as conn:
            assert conn.info.transaction_status == IDLE
            assert query_pid(conn) != pid
        assert pool.stats().validation_failures_total == 1
        wait_until(lambda: pid not in backend_pids(admin, app))
        check_pool(pool, admin)


def test_timed_out_waiter_never_receives_a_connection_and_order_is_kept(
    dsn: str, admin: Any
) -> None:
    """Scenario 15: on an exhausted pool waiters are served first come, first
    served; a waiter that timed out gets `PoolTimeout` by its deadline and is
    skipped, never handed a connection ("no connection was lost")."""
    with small_pool(dsn, min_size=2, max_size=2) as pool:
        pool.wait(5)
        held = [pool.getconn(), pool.getconn()]
        served: list[str] = []

        def waiter(name: str, position: int, timeout: float) -> Callable[[], Any]:
            def run() -> None:
                wait_until(lambda: pool.stats().waiting == position)
                if timeout < 1:
                    with bounded(timeout, 0.3), pytest.raises(PoolTimeout):
                        pool.getconn(timeout=timeout)
                    return
                with pool.connection(timeout=timeout):
                    served.append(name)
                    # A and C keep theirs until both are served: D comes third.
                    wait_until(lambda: len(served) >= 2)

            return run

        def release() -> None:
            wait_until(lambda: pool.stats().timeouts_total == 1)
            pool.putconn(held[0])
            wait_until(lambda: len(served) == 1)  # one at a time
            pool.putconn(held[1])

        run_all(
            [
                waiter("A", 0, 5),
                waiter("B", 1, 0.2),
                waiter("C", 2, 5),
                waiter("D", 3, 5),
                release,
            ]
        )
        assert served == ["A", "C", "D"]
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use) == (2, 2, 0)
        assert stats.timeouts_total == 1 and stats.borrowed_total == 5
        check_pool(pool, admin)


def test_max_waiting_refuses_at_once_and_frees_places_as_waiters_leave(
    dsn: str, admin: Any
) -> None:
    """Scenario 15: with `max_waiting` callers queued, the next is refused at
    once with `PoolOverloaded` naming the setting; once a waiter leaves (it
    timed out) a new caller may queue again and is served."""
    with small_pool(dsn, min_size=1, max_size=1, max_waiting=2) as pool:
        held = pool.getconn()

        def patient() -> None:
            with pool.connection(timeout=5):
                pass

        def impatient() -> None:
            wait_until(lambda: pool.stats().waiting == 1)
            with pytest.raises(PoolTimeout):
                pool.getconn(timeout=0.3)

        def refused_then_queued() -> None:
            wait_until(lambda: pool.stats().waiting == 2)
            with bounded(0.0, 0.2), pytest.raises(PoolOverloaded) as info:
                pool.getconn(timeout=5)
            assert "max_waiting=2" in str(info.value)
            wait_until(lambda: pool.stats().timeouts_total == 1)
            with pool.connection(timeout=5):
                pass

        def release() -> None:
            wait_until(
                lambda: pool.stats().timeouts_total == 1 and pool.stats().waiting == 2
            )
            pool.putconn(held)

        run_all([patient, impatient, refused_then_queued, release])
        stats = pool.stats()
        assert stats.overloaded_total == 1 and stats.timeouts_total == 1
        check_pool(pool, admin)


def test_thundering_herd_stays_under_max_size_with_few_connects_at_once(
    dsn: str, admin: Any
) -> None:
    """Scenario 16: 50 callers at once on a cold pool (min 1, max 10) with slow
    connects are all served; the pool and the server never count more than
    `max_size` connections, and at most 3 are being opened at any time."""
    with small_pool(dsn, min_size=1, max_size=10) as pool:
        app = pool.config.application_name
        pool.wait(5)
        peak = Counter[str]()
        done = False

        def slow_connect(entry: Entry) -> Any:
            peak["opening"] = max(peak["opening"], pool.stats().opening)
            return pause(0.1)

        pool._seams = {"connect": slow_connect}

        def caller() -> Callable[[], Any]:
            def run() -> None:
                with pool.connection(timeout=5) as conn:
                    conn.execute("SELECT pg_sleep(0.02)")
                    peak["size"] = max(peak["size"], pool.stats().size)

            return run

        def watch_server() -> None:
            while not done:
                peak["server"] = max(peak["server"], len(backend_pids(admin, app)))
                asleep(0.01)

        def herd() -> None:
            nonlocal done
            try:
                run_all([caller() for _ in range(50)])
            finally:
                done = True

        run_all([herd, watch_server])
        pool._seams = None
        stats = pool.stats()
        assert stats.borrowed_total == 50
        assert peak["size"] <= 10 and peak["server"] <= 10, peak
        assert 1 <= peak["opening"] <= 3, peak
        assert stats.connections_opened_total <= 10
        check_pool(pool, admin)


def test_a_hanging_connect_does_not_block_other_borrowers(dsn: str, admin: Any) -> None:
    """Scenario 16: while one connection attempt hangs, the other attempts and
    the connections given back keep serving callers."""
    with small_pool(dsn, min_size=1, max_size=4) as pool:
        pool.wait(5)
        gate = Gate()
        hooks = itertools.count()

        def first_hangs(entry: Entry) -> Any:
            if next(hooks) == 0:
                return gate.hook(entry)
            return None

        pool._seams = {"connect": first_hangs}
        held = pool.getconn()
        try:

            def caller() -> Callable[[], Any]:
                def run() -> None:
                    with pool.connection(timeout=3) as conn:
                        conn.execute("SELECT pg_sleep(0.05)")

                return run

            with bounded(1.5):
                run_all([caller() for _ in range(6)])
            assert gate.entered == 1 and pool.stats().opening == 1
        finally:
            gate.open()
        pool.putconn(held)
        pool._seams = None
        wait_until(lambda: pool.stats().opening == 0)
        assert pool.stats().size <= 4
        check_pool(pool, admin)


def test_failed_connects_do_not_eat_capacity(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 17: connection attempts that fail ("too many clients", 53300)
    are retried and never count as slots: afterwards the pool still reaches
    `max_size`, its count matches the server's, and each failure is counted."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    with small_pool(dsn, min_size=1, max_size=3) as pool:
        pool.wait(5)
        hooks = itertools.count()

        def refuse_three(entry: Entry) -> None:
            if next(hooks) < 3:
                raise psycopg.errors.TooManyConnections("sorry, too many clients")

        pool._seams = {"connect": refuse_three}
        holding = 0

        def caller() -> Callable[[], Any]:
            def run() -> None:
                nonlocal holding
                with pool.connection(timeout=5):
                    holding += 1
                    # All three at once: the failures did not use up capacity.
                    wait_until(lambda: holding == 3, timeout=5)
                    assert pool.stats().size <= 3

            return run

        run_all([caller() for _ in range(3)])
        pool._seams = None
        stats = pool.stats()
        assert stats.connection_errors_total == 3
        assert stats.size == 3 and not stats.server_down
        assert len(logged(caplog, "could not connect", logging.WARNING)) == 3
        check_pool(pool, admin)


def test_reserved_lane_is_served_while_others_saturate_and_connects_fail(
    dsn: str, admin: Any
) -> None:
    """Scenario 18: while two lanes saturate the pool and some connects fail,
    the reserved lane is served promptly, no lane ever exceeds its limit, the
    pool never exceeds `max_size`, and all lane counters return to zero."""
    with small_pool(dsn, min_size=2, max_size=5, lanes="batch:0:3,api:2:2") as pool:
        pool.wait(5)
        hooks = itertools.count()

        def every_third_fails(entry: Entry) -> None:
            if next(hooks) % 3 == 0:
                raise psycopg.errors.TooManyConnections("sorry, too many clients")

        pool._seams = {"connect": every_third_fails}
        api_waits: list[float] = []
        done = False
        violations: list[Any] = []

        def hammer(lane: str | None) -> Callable[[], Any]:
            def run() -> None:
                while not done:
                    try:
                        with pool.connection(lane=lane, timeout=0.3) as conn:
                            conn.execute("SELECT pg_sleep(0.01)")
                    except PoolTimeout:
                        pass

            return run

        def api() -> None:
            nonlocal done
            try:
                for _ in range(20):
                    t0 = time.monotonic()
                    with pool.connection(lane="api", timeout=2) as conn:
                        api_waits.append(time.monotonic() - t0)
                        conn.execute("SELECT pg_sleep(0.01)")
                    asleep(0.01)
            finally:
                done = True

        def watch() -> None:
            while not done:
                stats = pool.stats()
                lanes = stats.lanes
                if (
                    stats.size > 5
                    or lanes["batch"].in_use > 3
                    or lanes["api"].in_use > 2
                    or sum(lane.in_use for lane in lanes.values()) != stats.in_use
                ):
                    violations.append(stats)
                asleep(0.002)

        run_all(
            [hammer("batch") for _ in range(6)]
            + [hammer(None) for _ in range(4)]
            + [api, watch]
        )
        pool._seams = None
        assert not violations, violations[0]
        assert len(api_waits) == 20 and max(api_waits) < 0.5, api_waits
        stats = pool.stats()
        assert stats.connection_errors_total >= 1
        assert all(
            lane.in_use == 0 and lane.waiting == 0 for lane in stats.lanes.values()
        )
        check_pool(pool, admin)


# -- F. lifecycle (scenarios 22-27) -------------------------------------------


def test_close_fails_every_waiter_and_closes_connections_as_they_return(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 22: closing a pool with callers waiting (on two lanes) and
    connections on loan fails every waiter at once with `PoolClosed`, waits for
    the borrowers, closes their connections when they come back, and leaves
    no backend and no background work behind."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    pool = small_pool(dsn, min_size=2, max_size=2, lanes="a:1:1")
    pool.open(wait=True)
    held = [pool.getconn(), pool.getconn(lane="a")]
    failed: list[float] = []
    closing: list[float] = []

    def waiter(lane: str | None) -> Callable[[], Any]:
        def run() -> None:
            with pytest.raises(PoolClosed, match="closed while waiting"):
                pool.getconn(lane=lane, timeout=10)
            failed.append(time.monotonic())

        return run

    def closer() -> None:
        wait_until(lambda: pool.stats().waiting == 4)
        closing.append(time.monotonic())
        with bounded(2.0):
            pool.close(timeout=5)

    def borrowers() -> None:
        wait_until(lambda: bool(closing))
        asleep(0.1)  # they finish their work a moment after the close
        for conn in held:
            conn.execute("SELECT 1")  # still usable until given back
            pool.putconn(conn)

    run_all([waiter(None), waiter(None), waiter("a"), waiter("a"), closer, borrowers])
    assert len(failed) == 4 and max(failed) - closing[0] < 0.5
    assert not logged(caplog, "still on loan", logging.WARNING)
    check_closed(pool, admin)


def test_close_cuts_off_connections_not_given_back_in_time(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 22: a connection still on loan when `close(timeout)` runs out
    is cut off (its work is not committed), reported with where it was
    borrowed, and giving it back afterwards is harmless."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    admin.execute("CREATE TABLE t (x int)")
    pool = small_pool(dsn, min_size=1, max_size=1)
    pool.open(wait=True)
    line = sys._getframe().f_lineno + 1
    conn = pool.getconn()
    pid = query_pid(conn)
    conn.execute("INSERT INTO t VALUES (1)")
    with bounded(0.3, 1.0):
        pool.close(timeout=0.3)
    (msg,) = logged(caplog, "still on loan", logging.WARNING)
    assert f"backend pid {pid}" in msg
    assert f"test_lifecycle_async.py:{line} in test_close_cuts_off" in here(msg)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    pool.putconn(conn)
    check_closed(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 0


def test_double_return_never_lends_one_connection_twice(dsn: str, admin: Any) -> None:
    """Scenario 23: giving a connection back twice (one after the other, or
    from two borrowers at the same instant) succeeds once and raises
    `ConnectionReturned` otherwise; the connection is never in the idle set
    twice, so it is never lent to two borrowers."""
    with small_pool(dsn, min_size=2, max_size=2) as pool:
        pool.wait(5)
        conn = pool.getconn()
        pool.putconn(conn)
        with pytest.raises(ConnectionReturned, match="not on loan"):
            pool.putconn(conn)
        with pool.connection() as conn:
            pass
        with pytest.raises(ConnectionReturned):
            pool.putconn(conn)
        a, b = pool.getconn(), pool.getconn()
        assert a.info.backend_pid != b.info.backend_pid
        pool.putconn(a)
        pool.putconn(b)

        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # threads: interleave the two returns
        try:
            for _ in range(100):
                conn = pool.getconn()

                def give_back(conn: Any = conn) -> None:
                    pool.putconn(conn)

                results = run_settled([give_back, give_back])
                assert sorted(type(r).__name__ for r in results) == [
                    "ConnectionReturned",
                    "NoneType",
                ], results
                with pool._lock:
                    idle = list(pool._core.idle)
                assert len(idle) == len(set(idle)) == 2
        finally:
            sys.setswitchinterval(switch)
        check_pool(pool, admin)


def test_foreign_and_unknown_connections_are_refused_untouched(
    dsn: str, admin: Any
) -> None:
    """Scenario 23: a connection from another pool, a plain psycopg
    connection, or something else given to `putconn()` raises
    `ConnectionReturned`; neither pool's accounting changes and the refused
    connection is left working."""
    with small_pool(dsn) as pool, small_pool(dsn) as other:
        pool.wait(5)
        other.wait(5)
        foreign = other.getconn()
        before = (pool.stats().idle, other.stats().in_use)
        with pytest.raises(ConnectionReturned, match="another pool"):
            pool.putconn(foreign)
        assert (pool.stats().idle, other.stats().in_use) == before
        foreign.execute("SELECT 1")  # still the other pool's, still working
        other.putconn(foreign)

        raw = psycopg.Connection.connect(dsn)
        try:
            with pytest.raises(ConnectionReturned, match="not on loan"):
                pool.putconn(raw)  # type: ignore[arg-type]
            raw.execute("SELECT 1")
        finally:
            raw.close()
        with pytest.raises(ConnectionReturned):
            pool.putconn(object())  # type: ignore[arg-type]
        check_pool(pool, admin)
        check_pool(other, admin)


def test_every_use_of_a_returned_handle_raises_connection_returned(
    dsn: str, admin: Any
) -> None:
    """Scenario 24: after `putconn()`, every way of using the old handle
    (queries, cursors old and new, transactions, commit, rollback, settings,
    COPY, pipeline, close, attributes) raises `ConnectionReturned`, and the
    next borrower of the same backend is not disturbed by any of it."""
    admin.execute("CREATE TABLE t (x int)")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        stale = pool.getconn()
        pid = query_pid(stale)
        old_cursor = stale.cursor()
        pool.putconn(stale)

        owner = pool.getconn()
        assert query_pid(owner) == pid
        owner.execute("INSERT INTO t VALUES (1)")

        def in_transaction() -> None:
            with stale.transaction():
                pass

        def in_pipeline() -> None:
            with stale.pipeline():
                pass

        def copying() -> None:
            with stale.cursor().copy("COPY t TO STDOUT"):
                pass

        uses: dict[str, Callable[[], Any]] = {
            "execute": lambda: stale.execute("DELETE FROM t"),
            "new cursor": lambda: stale.cursor().execute("DELETE FROM t"),
            "old cursor": lambda: old_cursor.execute("DELETE FROM t"),
            "commit": stale.commit,
            "rollback": stale.rollback,
            "set_autocommit": lambda: stale.set_autocommit(True),
            "transaction": in_transaction,
            "pipeline": in_pipeline,
            "copy": copying,
            "close": stale.close,
        }
        for name, use in uses.items():
            with pytest.raises(ConnectionReturned):
                use()
                pytest.fail(f"{name} worked on a returned handle")
        for attribute in ("info", "closed", "autocommit", "pgconn", "adapters"):
            with pytest.raises(ConnectionReturned):
                getattr(stale, attribute)
        assert "returned to the pool" in repr(stale)

        # The owner's transaction went on undisturbed.
        assert owner.info.transaction_status == INTRANS
        cur = owner.execute("SELECT count(*) FROM t")
        assert cur.fetchone() == (1,)
        owner.commit()
        pool.putconn(owner)
        check_pool(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 1


def test_leak_is_reported_once_with_its_site_and_its_late_return(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 25: a connection held past `leak_detection_threshold` is
    reported once (however long it stays out), with the borrowing code's
    file:line; `describe()` flags it; its late return is logged; the next
    borrow of it starts with a clean slate."""
    caplog.set_level(logging.INFO, logger="pgwarden")
    with small_pool(dsn, min_size=1, max_size=1, leak_detection_threshold=0.1) as pool:
        line = sys._getframe().f_lineno + 1
        conn = pool.getconn()
        pid = conn.info.backend_pid
        wait_until(lambda: pool.stats().leaks_total == 1)
        asleep(0.4)  # let four more thresholds pass: still one report
        (msg,) = logged(caplog, "possible connection leak", logging.WARNING)
        assert f"backend pid {pid}" in msg
        assert f"test_lifecycle_async.py:{line} in test_leak_is_reported" in here(msg)
        (info,) = pool.describe()
        assert info.pid == pid and info.leak_suspected
        pool.putconn(conn)
        (back,) = logged(caplog, "was given back after", logging.INFO)
        assert f"backend pid {pid}" in back
        assert "test_lifecycle_async.py" in here(back)

        with pool.connection():
            asleep(0.05)  # under the threshold: not a leak
        (info,) = pool.describe()
        assert not info.leak_suspected
        assert pool.stats().leaks_total == 1
        assert len(logged(caplog, "possible connection leak", logging.WARNING)) == 1
        check_pool(pool, admin)


def test_garbage_collected_handle_is_reclaimed_for_a_waiter(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 25: a handle garbage collected while on loan gives its slot
    back: a caller already waiting is served (within a maintenance tick), the
    lost transaction is rolled back by the server, and one warning names
    where the connection was borrowed."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    admin.execute("CREATE TABLE t (x int)")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        app = pool.config.application_name
        line = sys._getframe().f_lineno + 1
        conn = pool.getconn()
        pid = conn.info.backend_pid
        conn.execute("INSERT INTO t VALUES (1)")

        def waiter() -> int:
            with pool.connection(timeout=3) as conn:
                return query_pid(conn)

        waiting = start(waiter)
        wait_until(lambda: pool.stats().waiting == 1)
        del conn
        gc.collect()
        new_pid = waiting(2.0)
        assert isinstance(new_pid, int) and new_pid != pid
        assert pool.stats().reclaimed_total == 1
        (msg,) = logged(caplog, "garbage collected", logging.WARNING)
        assert f"test_lifecycle_async.py:{line} in test_garbage_collected" in here(msg)
        wait_until(lambda: pid not in backend_pids(admin, app))
        check_pool(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 0


def test_reclaim_report_names_the_borrower(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 25: the report of a garbage-collected handle names the task or
    thread that borrowed it, like the leak report does."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        del conn
        gc.collect()
        wait_until(lambda: pool.stats().reclaimed_total == 1, timeout=3)
        check_pool(pool, admin)
    (msg,) = logged(caplog, "garbage collected", logging.WARNING)
    assert "unknown borrower" not in msg, msg


def test_give_back_stopped_halfway_loses_no_slot(
    dsn: str,
    admin: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KeyboardInterrupt in the middle of a give-back (here: while the pool
    undoes client-side changes) leaves the connection between hands. Once no
    honest hand-over can still be running, the maintenance drops it: a waiting
    caller gets a new one, the old session ends, one warning says why."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    monkeypatch.setattr(_core, "STRANDED_AFTER", 0.0)  # limit: 2 x 0.2 s
    restore = PooledConnection._pgw_restore

    def interrupted(self: Any) -> None:
        monkeypatch.setattr(PooledConnection, "_pgw_restore", restore)  # once
        raise KeyboardInterrupt

    with small_pool(dsn, min_size=1, max_size=1, validation_timeout=0.2) as pool:
        app = pool.config.application_name
        with pytest.raises(KeyboardInterrupt):
            with pool.connection() as conn:
                pid = query_pid(conn)
                monkeypatch.setattr(PooledConnection, "_pgw_restore", interrupted)
        assert pool.stats().in_use == 1  # neither on loan nor back
        with pool.connection(timeout=5) as conn:
            assert query_pid(conn) != pid
        assert pool.stats().reclaimed_total == 1
        (msg,) = logged(caplog, "between hands", logging.WARNING)
        assert f"backend pid {pid}" in msg and "being given back" in msg
        wait_until(lambda: pid not in backend_pids(admin, app), timeout=3)
        check_pool(pool, admin)


def test_borrow_outliving_the_stranded_limit_gets_another_connection(
    dsn: str, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A borrow whose hand-over outlives the stranded limit anyway (here held
    at the validation query) has its connection dropped under it; it fails
    cleanly on the cut socket and goes on with another connection, and that
    failure is not counted against the server."""
    monkeypatch.setattr(_core, "STRANDED_AFTER", 0.0)
    with small_pool(dsn, min_size=1, max_size=1, validation_timeout=0.2) as pool:
        pool.wait(5)
        (first,) = [c.pid for c in pool.describe()]

        def hold(entry: Entry) -> Any:
            pool._seams = None  # once
            return wait_until(lambda: pool.stats().reclaimed_total == 1, timeout=5)

        pool._seams = {"validate": hold}
        force_validation(pool)
        with pool.connection(timeout=5) as conn:
            assert query_pid(conn) != first
        stats = pool.stats()
        assert stats.reclaimed_total == 1
        assert stats.validation_failures_total == 0, stats
        check_pool(pool, admin)


def test_give_back_outliving_the_stranded_limit_ends_cleanly(
    dsn: str,
    admin: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A give-back that outlives the stranded limit anyway (here held at the
    rollback) has its connection dropped under it: the rollback fails on the
    cut socket, the transaction is not committed, nothing is released twice,
    and only the drop is reported (no lost connection, no failed reset)."""
    caplog.set_level(logging.INFO, logger="pgwarden")
    monkeypatch.setattr(_core, "STRANDED_AFTER", 0.0)
    admin.execute("CREATE TABLE t (x int)")
    with small_pool(
        dsn,
        min_size=1,
        max_size=1,
        validation_timeout=0.2,
        leak_detection_threshold=0.1,
    ) as pool:

        def hold(entry: Entry) -> Any:
            return wait_until(lambda: pool.stats().reclaimed_total == 1, timeout=5)

        conn = pool.getconn()
        conn.execute("INSERT INTO t VALUES (1)")
        wait_until(lambda: pool.stats().leaks_total == 1)
        pool._seams = {"rollback": hold}
        pool.putconn(conn)
        pool._seams = None
        stats = pool.stats()
        assert stats.in_use == 0
        assert stats.connections_lost_total == 0, stats
        with pool.connection(timeout=5) as conn:
            assert query_pid(conn)
        check_pool(pool, admin)
    assert count(admin, "SELECT count(*) FROM t") == 0
    assert len(logged(caplog, "between hands", logging.WARNING)) == 1
    assert not logged(caplog, "resetting a connection", logging.WARNING)
    assert not logged(caplog, "was given back after", logging.INFO)


def test_borrow_validated_after_its_drop_gets_another_connection(
    dsn: str, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A borrow whose validation query succeeds only after its connection was
    dropped as stranded does not hand that connection out: it takes another."""
    monkeypatch.setattr(_core, "STRANDED_AFTER", 0.0)
    with small_pool(dsn, min_size=1, max_size=1, validation_timeout=0.2) as pool:
        pool.wait(5)
        (first,) = [c.pid for c in pool.describe()]
        validate = pool._run_validation

        def slow_validation(conn: Any, timeout: float) -> None:
            monkeypatch.setattr(pool, "_run_validation", validate)  # once
            wait_until(lambda: pool.stats().reclaimed_total == 1, timeout=5)

        monkeypatch.setattr(pool, "_run_validation", slow_validation)
        force_validation(pool)
        with pool.connection(timeout=5) as conn:
            assert query_pid(conn) != first
        check_pool(pool, admin)


def test_max_lifetime_retires_connections_on_return_never_on_loan(
    dsn: str, admin: Any
) -> None:
    """Scenario 26: under load, connections are rotated at `max_lifetime`:
    never handed out past it, never closed while on loan (a connection held
    beyond its lifetime keeps working and is retired when given back), with
    expiry times spread by jitter, and never above `max_size`."""
    lifetime = 0.4
    with small_pool(dsn, min_size=2, max_size=3, max_lifetime=lifetime) as pool:
        app = pool.config.application_name
        pool.wait(5)
        with pool._lock:
            spans = [e.expires_at - e.created_at for e in pool._core.entries]
        assert all(0.95 * lifetime <= s <= lifetime for s in spans), spans
        assert len(set(spans)) == len(spans), "expiry not spread by jitter"

        held = pool.getconn()
        held_pid = held.info.backend_pid
        stop = time.monotonic() + 1.0  # the workers run for 2.5 lifetimes
        seen: set[int] = set()
        peak = 0

        def worker() -> Callable[[], Any]:
            def run() -> None:
                nonlocal peak
                while time.monotonic() < stop:
                    with pool.connection(timeout=3) as conn:
                        pid = conn.info.backend_pid
                        seen.add(pid)
                        info = {c.pid: c for c in pool.describe()}[pid]
                        assert info.held_seconds is not None
                        assert info.age_seconds - info.held_seconds < lifetime
                        conn.execute("SELECT pg_sleep(0.02)")
                        assert pid in backend_pids(admin, app)
                        peak = max(peak, pool.stats().size)

            return run

        run_all([worker(), worker()])
        # `held` is 2.5 lifetimes old: still usable, retired once given back.
        held.execute("SELECT 1")
        pool.putconn(held)
        wait_until(lambda: held_pid not in backend_pids(admin, app))
        assert len(seen) >= 4 and peak <= 3
        assert pool.stats().evictions_total >= 3
        check_pool(pool, admin)


def test_idle_shrink_closes_only_idle_connections_down_to_min_size(
    dsn: str, admin: Any
) -> None:
    """Scenario 26: idle connections beyond `min_size` are closed after
    `idle_timeout`, while connections on loan are left alone and keep
    working; once they are back the pool shrinks to `min_size`."""
    with small_pool(dsn, min_size=1, max_size=4, idle_timeout=0.2) as pool:
        app = pool.config.application_name
        conns = [pool.getconn(timeout=3) for _ in range(4)]
        kept = conns[:2]
        for conn in conns[2:]:
            pool.putconn(conn)
        wait_until(lambda: pool.stats().size == 2, message="idle ones closed")
        wait_until(lambda: len(backend_pids(admin, app)) == 2)
        for conn in kept:
            conn.execute("SELECT 1")
            pool.putconn(conn)
        wait_until(lambda: pool.stats().size == 1, message="down to min_size")
        check_pool(pool, admin)


def test_client_side_adapters_and_handlers_do_not_leak_to_the_next_borrower(
    dsn: str, admin: Any
) -> None:
    """Scenario 27: what a borrower installs on the connection object
    (a type loader, a notice handler, a notify handler, prepare_threshold)
    is gone for the next borrower: it neither changes how the next borrower's
    data is read nor sends the next borrower's messages to the previous one."""
    heard: list[str] = []

    class Shouting(TextLoader):
        def load(self, data: Any) -> str:
            return bytes(data).decode().upper()

    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            conn.adapters.register_loader("text", Shouting)
            conn.add_notice_handler(lambda diag: heard.append("notice"))
            conn.add_notify_handler(lambda notify: heard.append("notify"))
            conn.prepare_threshold = None
            # A cursor made after the registration: psycopg then clears the
            # flags that say the connection has adapters of its own.
            cur = conn.execute("SELECT 'shout'::text")
            assert cur.fetchone() == ("SHOUT",)

        leaks = []
        with pool.connection() as conn:
            assert conn.info.backend_pid == pid
            conn.set_autocommit(True)
            cur = conn.execute("SELECT 'quiet'::text")
            if cur.fetchone() != ("quiet",):
                leaks.append("text loader")
            conn.execute("DO $$ BEGIN RAISE NOTICE 'private'; END $$")
            conn.execute("LISTEN ch")
            conn.execute("NOTIFY ch, 'private'")
            conn.execute("UNLISTEN ch")
            if heard:
                leaks.append(f"handlers: {heard}")
            if conn.prepare_threshold != 5:
                leaks.append(f"prepare_threshold={conn.prepare_threshold}")
        check_pool(pool, admin)
    assert not leaks, leaks


def test_a_dumper_or_a_type_alone_does_not_leak_to_the_next_borrower(
    dsn: str,
) -> None:
    """Scenario 27, for what psycopg keeps apart from loaders and dumpers with
    a fixed oid: a dumper registered by Python type only, and a `TypeInfo`."""

    class Whispering(Dumper):  # no fixed oid
        def dump(self, obj: Any) -> bytes:
            return str(obj).lower().encode()

    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            conn.adapters.register_dumper(str, Whispering)
            cur = conn.execute("SELECT %s::text", ["LOUD"])
            assert cur.fetchone() == ("loud",)  # the dumper works
        with pool.connection() as conn:
            cur = conn.execute("SELECT %s::text", ["LOUD"])
            assert cur.fetchone() == ("LOUD",)

        with pool.connection() as conn:
            conn.execute("CREATE TYPE pgw_mood AS ENUM ('calm')")
            info = TypeInfo.fetch(conn, "pgw_mood")
            assert info is not None
            info.register(conn)
            conn.execute("SELECT 1")
            assert conn.adapters.types.get("pgw_mood") is info
        with pool.connection() as conn:
            assert conn.adapters.types.get("pgw_mood") is None
            conn.adapters.types.clear()
        with pool.connection() as conn:
            assert conn.adapters.types.get("text") is not None


def test_unread_notifications_do_not_reach_the_next_borrower(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            conn.set_autocommit(True)
            conn.execute("LISTEN secrets")
            conn.execute("NOTIFY secrets, 'for borrower 1'")
            conn.execute("UNLISTEN secrets")  # received all the same
        with pool.connection() as conn:
            assert conn.info.backend_pid == pid
            got = [n.payload for n in conn.notifies(timeout=0)]
            assert got == []


def test_a_notifies_generator_left_open_does_not_hold_the_connection(
    dsn: str,
) -> None:
    # The generator holds the connection's lock and its backlog until it is
    # closed, long after the give-back (an async one by the event loop).
    with small_pool(dsn, min_size=1, max_size=1, query_timeout=5) as pool:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            conn.set_autocommit(True)
            conn.execute("LISTEN ch")
            conn.execute("NOTIFY ch, 'first'")
            gen = conn.notifies()
            first = next(gen)
            assert first.payload == "first"

        def next_borrower(payload: str) -> list[str]:
            with pool.connection(timeout=5) as conn:
                assert conn.info.backend_pid == pid
                conn.set_autocommit(True)
                conn.execute(f"NOTIFY ch, '{payload}'")
                return [n.payload for n in conn.notifies(timeout=1)]

        assert next_borrower("second") == ["second"]
        gen.close()
        assert next_borrower("third") == ["third"]


def test_a_prepared_transaction_does_not_reach_the_next_borrower(
    dsn: str,
) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            conn.tpc_begin(conn.xid(1, f"pgw-{uuid.uuid4().hex}", "b"))
            conn.execute("SELECT 1")
            conn.tpc_prepare()  # the session is done with it
        try:
            with pool.connection() as conn:
                assert conn.info.backend_pid == pid
                cur = conn.execute("SELECT 2")
                assert cur.fetchone() == (2,)
            # Left to the next borrower, psycopg refused the block's commit.
        finally:
            with pool.connection() as conn:
                conn.set_autocommit(True)
                for (xid,) in (
                    conn.execute("SELECT gid FROM pg_prepared_xacts")
                ).fetchall():
                    conn.execute(
                        sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(xid))
                    )


@pytest.mark.parametrize("left_open", [False, True])
def test_a_connection_given_back_inside_a_pipeline_is_replaced(
    dsn: str, left_open: bool
) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        pid = conn.info.backend_pid
        conn.set_autocommit(left_open)
        pipeline = conn.pipeline()
        pipeline.__enter__()
        cur = conn.execute("SELECT 1")
        assert cur.fetchone() == (1,)  # synced: no query in progress
        if left_open:  # its block ends after the give-back (an exit stack...)
            pool.putconn(conn)
        else:  # a give-back inside the block
            with pytest.raises(ConnectionReturned):
                try:
                    pool.putconn(conn)
                finally:
                    pipeline.__exit__(None, None, None)
        with pool.connection() as conn:
            assert conn.info.backend_pid != pid
            assert conn.pgconn.pipeline_status == 0
            cur = conn.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        if left_open:
            with pytest.raises(ConnectionReturned):
                pipeline.__exit__(None, None, None)


def test_prepared_max_does_not_leak_to_the_next_borrower(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            conn.prepared_max = 1
        with pool.connection() as conn:
            assert conn.prepared_max == 100


def test_discard_all_also_empties_psycopgs_prepared_statement_cache(
    dsn: str,
) -> None:
    query = "SELECT %s::int * 2"
    with small_pool(dsn, min_size=1, max_size=1, reset_query="DISCARD ALL") as pool:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            for i in range(6):  # prepared from the 6th run on
                conn.execute(query, [i])
        for i in range(8):  # more returns than the prepare threshold
            with pool.connection() as conn:
                assert conn.info.backend_pid == pid
                cur = conn.execute(query, [i])
                assert cur.fetchone() == (2 * i,)


def test_reset_query_cleans_every_kind_of_server_session_state(
    dsn: str, admin: Any
) -> None:
    """Scenario 27: with `reset_query="DISCARD ALL"` nothing a borrower left
    on the server session reaches the next borrower of the same backend:
    settings (search_path, application_name), role, temporary tables, session
    advisory locks, LISTEN, prepared statements; psycopg's own prepared
    statements keep working after the DISCARD."""
    role = f"pgw_role_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        with small_pool(dsn, min_size=1, max_size=1, reset_query="DISCARD ALL") as pool:
            app = pool.config.application_name
            with pool.connection() as conn:
                pid = conn.info.backend_pid
                conn.execute("SET search_path TO pg_catalog")
                conn.execute("SET application_name TO 'someone-else'")
                conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
                conn.execute("RESET ROLE")
                conn.execute(
                    sql.SQL("SET SESSION AUTHORIZATION {}").format(sql.Identifier(role))
                )
                conn.execute("CREATE TEMP TABLE scratch (x int)")
                conn.execute("SELECT pg_advisory_lock(42)")
                conn.execute("LISTEN private_channel")
                conn.execute("PREPARE mine AS SELECT 1")
                for i in range(7):  # psycopg prepares it after 5 runs
                    conn.execute("SELECT %s::int", [i])

            with pool.connection() as conn:
                assert conn.info.backend_pid == pid
                cur = conn.execute(
                    "SELECT current_setting('search_path'),"
                    " current_setting('application_name'),"
                    " current_user = session_user,"
                    " session_user <> %s,"
                    " to_regclass('pg_temp.scratch') IS NULL,"
                    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    "  AND pid = pg_backend_pid()),"
                    " (SELECT count(*) FROM pg_listening_channels()),"
                    " (SELECT count(*) FROM pg_prepared_statements"
                    "  WHERE name = 'mine')",
                    [role],
                )
                assert cur.fetchone() == (
                    '"$user", public',
                    app,
                    True,
                    True,
                    True,
                    0,
                    0,
                    0,
                )
                for i in range(7):
                    conn.execute("SELECT %s::int", [i])
            check_pool(pool, admin)
    finally:
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_failing_reset_query_closes_the_connection(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 27 (and 4): when `reset_query` fails, the connection is not
    reused: it is closed and replaced, the failure is logged once, and the
    borrower who gave it back gets no exception."""
    caplog.set_level(logging.WARNING, logger="pgwarden")
    admin.execute("CREATE TABLE broken (); INSERT INTO broken DEFAULT VALUES")
    with small_pool(
        dsn,
        min_size=1,
        max_size=1,
        reset_query=FAILING_CHECK,
    ) as pool:
        with pool.connection() as conn:
            pid = query_pid(conn)
        admin.execute("DELETE FROM broken")
        with pool.connection(timeout=3) as conn:
            assert query_pid(conn) != pid
        (msg,) = logged(caplog, "resetting a connection", logging.WARNING)
        assert "division by zero" in msg
        check_pool(pool, admin)


# -- G. stress (scenario 30) ----------------------------------------------------


# Not strict: the random schedule hits the bug in most runs, not all (the
# deterministic proof is in test_cancel_async_only.py).
def test_randomized_borrowers_never_share_a_connection(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 30: thousands of randomized borrows (blocks, getconn/putconn,
    blocks that raise, connections given back in a transaction or failed,
    lanes, tiny timeouts, cancellations for threads) never lend one backend to
    two borrowers at once, never exceed the limits, and the counters add up."""
    caplog.set_level(logging.ERROR, logger="pgwarden")  # INTRANS warnings: noise
    rng = random.Random(20261127)
    owner: dict[int, int] = {}
    tally: Counter[str] = Counter()
    done = False

    class Boom(Exception):
        pass

    def take(pid: int, n: int) -> None:
        assert owner.setdefault(pid, n) == n, f"{pid} lent to {owner[pid]} and {n}"

    def give(pid: int, n: int) -> None:
        assert owner.pop(pid) == n

    with small_pool(
        dsn, min_size=2, max_size=4, lanes="a:1:2,b:0:3", max_waiting=0
    ) as pool:

        def borrow_once(n: int) -> None:
            lane = rng.choice([None, None, "a", "b"])
            timeout = rng.choice([0.001, 0.01, 2.0])
            kind = rng.random()
            if kind < 0.4:
                with pool.connection(lane=lane, timeout=timeout) as conn:
                    pid = conn.info.backend_pid
                    take(pid, n)
                    try:
                        if rng.random() < 0.2:
                            conn.execute("SELECT 1")
                        if rng.random() < 0.1:
                            raise Boom
                    finally:
                        give(pid, n)
            else:
                conn = pool.getconn(lane=lane, timeout=timeout)
                pid = conn.info.backend_pid
                take(pid, n)
                try:
                    if kind < 0.6:
                        conn.execute("SELECT 1")  # left INTRANS
                    elif kind < 0.7:
                        try:
                            conn.execute("SELECT 1 / 0")  # left INERROR
                        except psycopg.errors.DivisionByZero:
                            pass
                finally:
                    give(pid, n)
                    pool.putconn(conn)
            tally["ok"] += 1

        def worker(n: int) -> Callable[[], Any]:
            def run() -> None:
                for _ in range(250):
                    try:
                        borrow_once(n)
                    except PoolTimeout:
                        tally["timeout"] += 1
                    except Boom:
                        tally["ok"] += 1
                    if rng.random() < 0.2:
                        asleep(0)

            return run

        def watch() -> None:
            while not done:
                stats = pool.stats()
                assert stats.size <= 4 and stats.waiting >= 0, stats
                assert stats.lanes["a"].in_use <= 2 and stats.lanes["b"].in_use <= 3
                assert stats.size == (
                    stats.idle + stats.in_use + stats.opening + stats.checking
                ), stats
                asleep(0.001)

        def workers() -> None:
            nonlocal done
            try:
                run_all([worker(n) for n in range(12)])
            finally:
                done = True

        run_all([workers, watch])
        stats = pool.stats()
        assert tally["ok"] + tally["timeout"] + tally["cancelled"] == 12 * 250, tally
        assert tally["ok"] >= 1500, tally
        # A waiter whose deadline passed as it was cancelled counts as a timeout.
        assert 0 <= stats.timeouts_total - tally["timeout"] <= tally["cancelled"]
        assert stats.borrowed_total >= tally["ok"]
        assert not owner
        check_pool(pool, admin)


# -- configuration and credentials (scenarios 32-33) --------------------------


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"max_size": 0}, "max_size"),
        ({"min_size": 3, "max_size": 2}, "min_size"),
        ({"connection_timeout": "soon"}, "connection_timeout"),
        ({"lanes": "api:3:2"}, "lanes"),
        ({"max_sise": 3}, "did you mean 'max_size'"),
    ],
)
def test_invalid_setting_is_refused_by_the_pool_naming_it(
    settings: dict[str, Any], named: str
) -> None:
    """Scenario 32: building a pool with a bad setting raises `ConfigError`
    naming the setting, without showing the password. Nothing is opened, so
    there is no pool state to check afterwards."""
    secret = f"pw-{uuid.uuid4().hex}"
    with pytest.raises(ConfigError) as info:
        Pool(f"host=127.0.0.1 dbname=x password={secret}", **settings)
    assert named in str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value)


def test_password_never_appears_in_logs_errors_or_descriptions(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 33: a unique password, given in a key=value conninfo, a URI
    or through DB_PASSWORD, never appears in what the pool shows: repr,
    config, stats, describe(), PoolTimeout, leak, unleak, cut-off and reclaim
    reports, connect failures (including a driver error that quotes the
    conninfo), configuration errors; nor anywhere in pgwarden's DEBUG log."""
    caplog.set_level(logging.DEBUG, logger="pgwarden")
    secret = f"Pw-{uuid.uuid4().hex}-S3cr3t"
    role = f"pgw_secret_{uuid.uuid4().hex[:8]}"
    admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(secret)
        )
    )
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1")
    port = str(params.get("port") or 5432)
    dbname = str(params["dbname"])
    keyvalue = make_conninfo(dsn, user=role, password=secret)
    if host.startswith("/"):  # a Unix socket directory (PGWARDEN_TEST_DSN)
        uri = f"postgresql://{role}:{secret}@/{dbname}?host={host}&port={port}"
    else:
        uri = f"postgresql://{role}:{secret}@{host}:{port}/{dbname}"
    from_env = PoolConfig.from_env(
        {
            "DB_HOST": host,
            "DB_PORT": port,
            "DB_NAME": dbname,
            "DB_USER": role,
            "DB_PASSWORD": secret,
        },
        env_file=None,
    )
    shown: list[str] = []

    def exercise(config: PoolConfig | str) -> None:
        """Open a pool on `config` and go through every report it can make."""
        pool = Pool(
            config,
            min_size=1,
            max_size=1,
            connection_timeout=2,
            leak_detection_threshold=0.1,
            application_name=unique_app(),
        )
        shown.extend([repr(pool), repr(pool.config), str(pool.config)])
        pool.open(wait=True)
        conn = pool.getconn()
        wait_until(lambda: pool.stats().leaks_total == 1)
        with pytest.raises(PoolTimeout) as timeout:
            pool.getconn(timeout=0.05)
        shown.extend([str(timeout.value), repr(timeout.value), repr(pool)])
        shown.extend([json.dumps(pool.stats().as_dict()), repr(pool.describe())])
        pool.putconn(conn)  # the "given back after" report
        lost = pool.getconn()
        del lost  # the reclaim report
        gc.collect()
        wait_until(lambda: pool.stats().reclaimed_total == 1, timeout=3)
        check_pool(pool, admin)
        kept = pool.getconn()
        pool.close(timeout=0.05)  # the cut-off report
        pool.putconn(kept)
        check_closed(pool, admin)

    try:
        for config in (keyvalue, uri, from_env):
            exercise(config)

        # The server can't be reached: connect errors, PoolTimeout.last_error.
        unreachable = Pool(
            make_conninfo(keyvalue, port=free_port()),
            min_size=1,
            connection_timeout=2,
            application_name=unique_app(),
        )
        unreachable.open()
        with pytest.raises(PoolTimeout) as timeout:
            unreachable.getconn(timeout=0.5)
        shown += [str(timeout.value), str(timeout.value.last_error)]
        shown += [repr(unreachable), str(unreachable.stats())]
        unreachable.close()

        # A driver error quoting the connection string (psycopg2#1837).
        quoting = Pool(keyvalue, min_size=0, max_size=1, application_name=unique_app())

        def quote_conninfo(entry: Entry) -> None:
            raise psycopg.OperationalError(f"cannot use {keyvalue!r} or {uri!r}")

        quoting._seams = {"connect": quote_conninfo}
        quoting.open()
        with pytest.raises(PoolTimeout) as timeout:
            quoting.getconn(timeout=0.3)
        shown += [str(timeout.value), str(timeout.value.last_error)]
        shown += [str(quoting.stats())]
        assert quoting.stats().connection_errors_total >= 1
        quoting.close()
        check_closed(quoting, admin)

        # Bad configurations that carry the password.
        for bad in (
            lambda: Pool(keyvalue, max_size=0),
            lambda: Pool(f"password={secret} host='unterminated"),
            lambda: PoolConfig.from_env(
                {"DB_PASSWORD": secret, "DB_MAX_CONNECTIONS": "lots"}, env_file=None
            ),
        ):
            with pytest.raises(ConfigError) as error:
                bad()
            shown += [str(error.value), repr(error.value)]
    finally:
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))

    assert caplog.records
    leaked = [s for s in shown if secret in s]
    assert not leaked, leaked
    assert secret not in caplog.text
    for record in caplog.records:
        assert secret not in record.getMessage()
