# WARNING: generated from test_pool_async.py by tools/async_to_sync.py.
# DO NOT CHANGE THIS FILE: change test_pool_async.py and run the tool.
"""Pool against a real server. `test_pool.py` is generated from this file."""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import random
import signal
import sys
import time
import weakref
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from pgwarden import (
    ConfigError,
    ConnectionReturned,
    Pool,
    PoolClosed,
    PooledConnection,
    PoolOverloaded,
    PoolTimeout,
    QueryTimeout,
    UnknownLane,
)
from pgwarden.pool import _adaptive, _core, _messages
from pgwarden.pool._acompat import Event
from tests._util import wait_until
from tests.pool._helpers import backend_pids, free_port, run_all, unique_app


def run_blocking(func: Callable[..., Any], *args: Any) -> Any:
    return func(*args)


asleep = time.sleep


def small_pool(dsn: str, **kwargs: Any) -> Pool:
    """A pool with test-sized timeouts."""
    settings: dict[str, Any] = {
        "min_size": 1,
        "max_size": 4,
        "connection_timeout": 3.0,
        "application_name": unique_app(),
    }
    settings.update(kwargs)
    return Pool(dsn, **settings)


def query_pid(conn: Any) -> int:
    cur = conn.execute("SELECT pg_backend_pid()")
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


# -- configuration and basics -------------------------------------------------


def test_session_settings_come_from_the_config(dsn: str) -> None:
    with small_pool(dsn, statement_timeout="30s") as pool:
        with pool.connection() as conn:
            cur = conn.execute(
                "SELECT current_setting('statement_timeout'),"
                " current_setting('idle_in_transaction_session_timeout'),"
                " current_setting('application_name')"
            )
            assert cur.fetchone() == ("30s", "5min", pool.config.application_name)


def test_pool_accepts_a_config_and_overrides(dsn: str) -> None:
    from pgwarden import PoolConfig

    config = PoolConfig(conninfo=dsn, min_size=0, max_size=3)
    pool = Pool(config, max_size=2, name="mine")
    assert pool.config.max_size == 2 and pool.config.conninfo == dsn
    assert pool.name == "mine" and "mine" in repr(pool)
    with pytest.raises(ConfigError, match="min_size"):
        Pool(config, min_size=5)


def test_borrow_before_open_or_after_close_raises(dsn: str) -> None:
    pool = small_pool(dsn)
    with pytest.raises(PoolClosed, match="not open"):
        pool.getconn()
    pool.open()
    pool.close()
    with pytest.raises(PoolClosed, match="closed"):
        pool.getconn()
    with pytest.raises(PoolClosed):
        pool.open()


def test_min_size_kept_and_max_size_never_exceeded(dsn: str, admin: Any) -> None:
    with small_pool(dsn, min_size=2, max_size=4) as pool:
        app = pool.config.application_name
        pool.wait(5)
        assert pool.stats().size == 2
        wait_until(lambda: len(backend_pids(admin, app)) == 2)

        peak = 0

        def worker() -> None:
            nonlocal peak
            with pool.connection() as conn:
                conn.execute("SELECT pg_sleep(0.05)")
                peak = max(peak, pool.stats().in_use)
                assert len(backend_pids(admin, app)) <= 4

        run_all([worker for _ in range(12)])
        stats = pool.stats()
        assert peak <= 4 and stats.size <= 4
        assert stats.in_use == 0 and stats.waiting == 0
        assert stats.borrowed_total == 12
        wait_until(lambda: len(backend_pids(admin, app)) == pool.stats().size)


def test_idle_connections_closed_down_to_min_size(dsn: str, admin: Any) -> None:
    with small_pool(dsn, min_size=1, max_size=4, idle_timeout=0.3) as pool:
        app = pool.config.application_name
        conns = [pool.getconn(timeout=5) for _ in range(4)]
        assert pool.stats().size == 4
        for conn in conns:
            pool.putconn(conn)
        wait_until(lambda: pool.stats().size == 1, message="shrink to min_size")
        wait_until(lambda: len(backend_pids(admin, app)) == 1)
        assert pool.stats().evictions_total == 3


def test_which_idle_connection_a_busy_caller_gets(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "ALIVE_BYPASS_WINDOW", 30.0)  # slow CI machines
    with small_pool(dsn, min_size=4, max_size=4) as pool:
        pool.wait()
        pids = []
        for _ in range(12):
            with pool.connection() as conn:
                pids.append(query_pid(conn))
        # It alternates between two of four: the others can idle out.
        assert all(a != b for a, b in pairwise(pids))
        assert len(set(pids[2:])) == 2


def test_idle_order_survives_a_fork(dsn: str) -> None:
    pool = small_pool(dsn)
    rotation = pool._core.rotation
    pool._forget_after_fork()  # what the child runs after os.fork()
    assert pool._core.rotation == rotation


def test_borrows_are_served_first_come_first_served(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        order: list[int] = []
        holder = pool.getconn()

        def worker(i: int) -> Callable[[], Any]:
            def run() -> None:
                wait_until(lambda: pool.stats().waiting == i)
                with pool.connection(timeout=5):
                    order.append(i)

            return run

        def release() -> None:
            wait_until(lambda: pool.stats().waiting == 5)
            pool.putconn(holder)

        run_all([worker(i) for i in range(5)] + [release])
        assert order == list(range(5))


# -- validation ---------------------------------------------------------------


def test_terminated_idle_connections_are_never_handed_out(dsn: str, admin: Any) -> None:
    with small_pool(dsn, min_size=4, max_size=4) as pool:
        app = pool.config.application_name
        pool.wait(5)
        old = set(backend_pids(admin, app))
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE application_name = %s",
            [app],
        )
        # At once, every borrow works, even of connections used a moment ago.
        conns = [pool.getconn(timeout=5) for _ in range(4)]
        pids = {query_pid(conn) for conn in conns}
        assert not pids & old and len(pids) == 4
        for conn in conns:
            pool.putconn(conn)
        stats = pool.stats()
        assert stats.validation_failures_total == 4
        assert stats.connections_lost_total >= 4


def test_terminated_right_after_use_is_caught(dsn: str, admin: Any) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        for _ in range(3):
            with pool.connection() as conn:
                pid = query_pid(conn)
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
            with pool.connection() as conn:
                assert query_pid(conn) != pid


def test_ended_idle_sessions_are_replaced_without_a_borrow(
    dsn: str, admin: Any
) -> None:
    with small_pool(dsn, min_size=2, max_size=2) as pool:
        app = pool.config.application_name
        pool.wait(5)
        old = set(backend_pids(admin, app))
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE application_name = %s",
            [app],
        )

        def replaced() -> bool:
            pids = set(backend_pids(admin, app))
            return len(pids) == 2 and not pids & old and pool.stats().idle == 2

        wait_until(replaced, message="both idle connections replaced")
        assert pool.stats().borrowed_total == 0
        assert pool.stats().connections_lost_total >= 2


def test_eviction_runs_the_validation_query_on_idle_connections(
    dsn: str, admin: Any
) -> None:
    # The validation query fails on the backends listed in `doomed`.
    admin.execute("CREATE TABLE doomed (pid int)")
    query = (  # not "CASE ... THEN 1 / 0": the planner would fold that anyway
        "SELECT 1 / (1 - (SELECT count(*) FROM doomed"
        " WHERE pid = pg_backend_pid()))::int"
    )
    with small_pool(
        dsn,
        min_size=2,
        max_size=2,
        eviction_interval=0.1,
        tests_per_eviction_run=2,
        validation_query=query,
    ) as pool:
        app = pool.config.application_name
        pool.wait(5)
        old = set(backend_pids(admin, app))
        admin.execute("INSERT INTO doomed SELECT unnest(%s::int[])", [list(old)])

        def replaced() -> bool:
            pids = set(backend_pids(admin, app))
            return len(pids) == 2 and not pids & old and pool.stats().idle == 2

        wait_until(replaced, message="both idle connections replaced")
        stats = pool.stats()
        assert stats.borrowed_total == 0
        assert stats.validation_failures_total == 2
        assert stats.evictions_total == 2


def test_max_lifetime_is_enforced_at_hand_out(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=1, max_lifetime=0.3) as pool:
        with pool.connection() as conn:
            first = query_pid(conn)
        asleep(0.35)  # let the lifetime run out
        with pool.connection(timeout=5) as conn:
            assert query_pid(conn) != first


# -- timeouts -----------------------------------------------------------------


def test_query_timeout_raises_and_closes_the_connection(dsn: str, admin: Any) -> None:
    with small_pool(dsn, min_size=1, max_size=1, query_timeout=1) as pool:
        with pool.connection() as conn:
            pid = query_pid(conn)
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout, match="query_timeout"):
            with pool.connection() as conn:
                conn.execute("SELECT pg_sleep(10)")
        elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 2.0, elapsed
        with pool.connection(timeout=5) as conn:
            assert query_pid(conn) != pid
        wait_until(lambda: pid not in backend_pids(admin, None))


def test_query_timeout_when_the_server_stops_answering(
    dsn: str, pg_server: Any
) -> None:
    if pg_server.embedded is None:
        pytest.skip("needs to freeze a backend of a local server")
    with small_pool(dsn, min_size=1, max_size=1, query_timeout=0.5) as pool:
        with pool.connection() as conn:
            pid = query_pid(conn)
        os.kill(pid, signal.SIGSTOP)  # the backend stops answering, sockets open
        try:
            t0 = time.monotonic()
            with pytest.raises(QueryTimeout):
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
            assert time.monotonic() - t0 < 1.5
        finally:
            os.kill(pid, signal.SIGCONT)
        with pool.connection(timeout=5) as conn:
            assert query_pid(conn) != pid


def test_query_timeout_counts_from_the_start_of_each_query(dsn: str) -> None:
    # Short queries first: each wait's limit starts with its own query, so the
    # long one gets its full query_timeout, however long the connection was busy.
    with small_pool(dsn, min_size=1, max_size=1, query_timeout=1.0) as pool:
        with pool.connection() as conn:
            busy_until = time.monotonic() + 0.7
            while time.monotonic() < busy_until:
                conn.execute("SELECT 1")
            t0 = time.monotonic()
            with pytest.raises(QueryTimeout):
                conn.execute("SELECT pg_sleep(5)")
            elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 2.0, elapsed


def test_a_query_too_big_for_the_socket_buffer_goes_through(dsn: str) -> None:
    # Larger than the socket's buffer: psycopg waits for it to be writable.
    big = "x" * (20 * 1024 * 1024)
    with small_pool(dsn, min_size=1, max_size=1, query_timeout=30) as pool:
        with pool.connection() as conn:
            cur = conn.execute("SELECT length(%s)", (big,))
            assert cur.fetchone() == (len(big),)


def test_waiting_for_notifications_is_not_a_query(dsn: str) -> None:
    with small_pool(dsn, min_size=2, max_size=2, query_timeout=0.3) as pool:
        with pool.connection() as conn:
            conn.set_autocommit(True)
            conn.execute("LISTEN pgwarden_test")
            pid = query_pid(conn)
            # The caller's own timeout ends the wait quietly, as in psycopg.
            t0 = time.monotonic()
            assert [n for n in conn.notifies(timeout=0.8)] == []
            assert time.monotonic() - t0 >= 0.7

            def notify_later() -> None:
                asleep(0.8)
                with pool.connection() as other:
                    other.execute("NOTIFY pgwarden_test, 'hello'")

            def listen() -> list[str]:
                return [n.payload for n in conn.notifies(stop_after=1)]

            # No timeout: waits past query_timeout for the notification.
            got, _ = run_all([listen, notify_later])
            assert got == ["hello"]
            assert query_pid(conn) == pid
            # Queries keep their limit.
            with pytest.raises(QueryTimeout):
                conn.execute("SELECT pg_sleep(5)")


def test_pool_timeout_names_holders_and_usage(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=2) as pool:
        line = sys._getframe().f_lineno + 1
        held = [pool.getconn(), pool.getconn()]
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            pool.getconn(timeout=0.2)
        assert 0.2 <= time.monotonic() - t0 < 1.5
        msg = str(info.value)
        assert "2 of 2 in use" in msg
        assert f"test_pool_async.py:{line}" in msg.replace(
            "test_pool.py", "test_pool_async.py"
        )
        assert "test_pool_timeout_names_holders_and_usage" in msg
        assert isinstance(info.value, psycopg.OperationalError)
        assert pool.stats().timeouts_total == 1
        for conn in held:
            pool.putconn(conn)


def test_each_waiter_times_out_at_its_own_deadline(dsn: str) -> None:
    # Waiters queued behind one another, with the same and with different
    # timeouts: each gets PoolTimeout at its own deadline, none sooner or much
    # later, and one still waiting gets the connection when it comes back.
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        held = pool.getconn()
        t0 = time.monotonic()

        def borrow(after: float, timeout: float) -> tuple[str, float, float]:
            asleep(after)
            started = time.monotonic()
            try:
                conn = pool.getconn(timeout=timeout)
            except PoolTimeout:
                return "timeout", started - t0, time.monotonic() - started
            pool.putconn(conn)
            return "served", started - t0, time.monotonic() - started

        def give_back_later() -> None:
            asleep(2.5)
            pool.putconn(held)

        def call(after: float, timeout: float) -> Callable[[], Any]:
            return lambda: borrow(after, timeout)

        results = run_all(
            [
                call(0.0, 10.0),  # first in line: served when `held` comes back
                call(0.1, 0.4),  # behind it, a sooner deadline
                call(0.2, 0.4),
                call(0.3, 0.4),
                call(0.4, 1.5),  # a deadline past the first wait chunk (1 s)
                give_back_later,
            ]
        )
        first, *timed_out = results[:5]
        assert first[0] == "served" and first[2] >= 2.0, first
        for outcome, _, waited in timed_out[:3]:
            assert outcome == "timeout" and 0.35 <= waited < 0.7, timed_out
        outcome, _, waited = timed_out[3]
        assert outcome == "timeout" and 1.45 <= waited < 1.8, timed_out


def test_a_timeout_that_cannot_be_described_still_reaches_its_caller(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Describing where connections are held can fail (a deleted working
    # directory breaks os.getcwd()); the caller must still get PoolTimeout.
    real = _messages.timeout_message
    calls: list[int] = []

    def broken(*args: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError("the working directory is gone")
        return real(*args)

    monkeypatch.setattr(_messages, "timeout_message", broken)
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        held = pool.getconn()

        def borrow() -> BaseException | None:
            try:
                pool.getconn(timeout=0.3)
            except PoolTimeout as ex:
                return ex
            return None

        t0 = time.monotonic()
        results = run_all([borrow, borrow, borrow])
        assert all(isinstance(r, PoolTimeout) for r in results), results
        assert time.monotonic() - t0 < 3
        assert "describing a timeout failed" in caplog.text
        pool.putconn(held)


def test_max_waiting_refuses_at_once(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=1, max_waiting=1) as pool:
        held = pool.getconn()

        def waiter() -> None:
            with pool.connection(timeout=5):
                pass

        def overflow() -> None:
            wait_until(lambda: pool.stats().waiting == 1)
            t0 = time.monotonic()
            with pytest.raises(PoolOverloaded, match="max_waiting=1"):
                pool.getconn()
            assert time.monotonic() - t0 < 0.5
            pool.putconn(held)

        run_all([waiter, overflow])
        assert pool.stats().overloaded_total == 1


def test_max_waiting_does_not_lock_a_lane_out_of_its_reservation(
    dsn: str,
) -> None:
    with small_pool(dsn, min_size=0, max_size=4, max_waiting=2, lanes="a:2:2") as pool:
        held = [pool.getconn(), pool.getconn()]  # the shared room

        def waiter() -> None:
            with pytest.raises(PoolTimeout):
                pool.getconn(timeout=2)

        def reserved() -> None:
            wait_until(lambda: pool.stats().waiting == 2)
            with pytest.raises(PoolOverloaded):
                pool.getconn(timeout=2)  # the default lane: refused
            with pool.connection("a", timeout=2) as conn:
                assert query_pid(conn)

        run_all([waiter, waiter, reserved])
        for conn in held:
            pool.putconn(conn)


# -- adaptive concurrency --------------------------------------------------


def hold_lending_to(pool: Pool, limit: int) -> None:
    """Set the adaptive limit as a probe would. White box: measuring takes
    seconds of load, and no probe moves it in a test's few borrows."""
    core = pool._core
    assert core.adaptive is not None and core.adaptive.floor <= limit
    core.adaptive.limit = core.cap = limit


def timed_borrow(pool: Pool) -> float:
    """Seconds one borrow and a query took, the wait included."""
    t0 = time.monotonic()
    with pool.connection(timeout=8) as conn:
        query_pid(conn)
    return time.monotonic() - t0


def borrow_held_back_beside_an_idle_one(
    pool: Pool,
) -> tuple[float, list[Any]]:
    """With the limit at 1, lend all three connections (no queue: not held
    back), then time another caller's borrow: it queues, one connection is
    given back, idle, but the queue is held back. Return that borrow's
    seconds and the two connections still held."""
    hold_lending_to(pool, 1)
    held = [pool.getconn() for _ in range(3)]

    def give_one_back() -> None:
        wait_until(lambda: pool.stats().waiting == 1)
        pool.putconn(held.pop())

    waited, _ = run_all([lambda: timed_borrow(pool), give_one_back])
    return waited, held


def test_adaptive_concurrency_is_on_by_default_for_threads_only(
    dsn: str,
) -> None:
    with small_pool(dsn, min_size=0, max_size=2) as pool:
        assert pool.config.adaptive_concurrency is None  # auto
        assert pool._core.adaptive is not None
    for chosen in (True, False):
        with small_pool(
            dsn, min_size=0, max_size=2, adaptive_concurrency=chosen
        ) as pool:
            assert (pool._core.adaptive is not None) is chosen


def test_adaptive_concurrency_never_holds_a_caller_back_from_itself(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "SLOW_BORROW", math.inf)  # would serve it first
    with small_pool(dsn, min_size=3, max_size=3, adaptive_concurrency=True) as pool:
        pool.wait(5)
        hold_lending_to(pool, 1)
        held: list[Any] = []

        def holder() -> float:
            for _ in range(3):
                held.append(pool.getconn())  # no queue yet: not held back
            wait_until(lambda: pool.stats().waiting == 1)
            pool.putconn(held.pop())  # idle, but the queue is held back...
            elapsed = timed_borrow(pool)  # ...and so would this be
            for conn in held:
                pool.putconn(conn)
            return elapsed

        def queued() -> None:
            wait_until(lambda: pool.stats().in_use == 3)
            with pool.connection(timeout=8) as conn:
                query_pid(conn)

        elapsed, _ = run_all([holder, queued])
        assert elapsed < _core.STALL_AFTER  # not freed by the stall rule
        assert pool.stats().lend_limit == 1


def test_a_caller_held_back_beside_idle_connections_gets_one_soon(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "SLOW_BORROW", math.inf)  # the stall rule, then
    with small_pool(dsn, min_size=3, max_size=3, adaptive_concurrency=True) as pool:
        pool.wait(5)
        # Another caller's borrow, which the holders wait on.
        waited, held = borrow_held_back_beside_an_idle_one(pool)
        for conn in held:
            pool.putconn(conn)
        # The maintenance lifts the limit (every second here).
        assert _core.STALL_AFTER <= waited < _core.STALL_AFTER + 5
        assert pool.stats().lend_limit == 3


def test_a_caller_held_back_behind_slow_borrows_gets_one_soon(
    dsn: str,
) -> None:
    with small_pool(dsn, min_size=3, max_size=3, adaptive_concurrency=True) as pool:
        pool.wait(5)
        # The two still on loan (a report, say) are slow soon: the limit
        # stops counting them, within a maintenance step (WATCH_INTERVAL).
        waited, held = borrow_held_back_beside_an_idle_one(pool)
        assert waited < _core.STALL_AFTER
        assert pool.stats().lend_limit == 3  # 1, and 2 slow
        for conn in held:
            pool.putconn(conn)
        # Not the stall rule: the limit learned is still there.
        adaptive = pool._core.adaptive
        assert adaptive is not None
        assert adaptive.limit == 1 and adaptive._stalls == 0
        wait_until(lambda: pool.stats().lend_limit == 1)


def test_a_holder_is_not_held_back_when_no_connection_is_idle(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool shrank to what the limit lends: a nested borrow needs a new one.
    monkeypatch.setattr(_core, "SLOW_BORROW", math.inf)  # would serve it too
    with small_pool(dsn, min_size=1, max_size=3, adaptive_concurrency=True) as pool:
        pool.wait(5)
        hold_lending_to(pool, 1)
        with pool.connection(timeout=5) as outer:
            assert pool.stats().size == 1
            t0 = time.monotonic()
            with pool.connection(timeout=5) as inner:
                assert query_pid(inner) != query_pid(outer)
            # A connect, not the stall rule (nor a timeout).
            assert time.monotonic() - t0 < _core.STALL_AFTER


def test_a_lone_caller_with_no_idle_connection_gets_a_new_one(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "SLOW_BORROW", math.inf)  # would serve it too
    with small_pool(dsn, min_size=1, max_size=3, adaptive_concurrency=True) as pool:
        pool.wait(5)
        hold_lending_to(pool, 1)
        with pool.connection(timeout=5):
            assert pool.stats().size == 1
            # Another caller; nobody waits: nothing holds it back.
            (waited,) = run_all([lambda: timed_borrow(pool)])
        assert waited < _core.STALL_AFTER  # a connect, not the stall rule
        assert pool.stats().size == 2


def count_maintenance(pool: Pool) -> list[float]:
    """Record when each maintenance step starts, and make its usual pace 5 s
    from the next step on, to tell it from WATCH_INTERVAL."""
    steps: list[float] = []
    maintain = pool._maintain

    def counted() -> float:
        steps.append(time.monotonic())
        return maintain()

    pool._maintain = counted  # type: ignore[method-assign]
    pool._tick = 5.0
    return steps


def after_a_step(steps: list[float]) -> None:
    """Wait for a maintenance step: the next is then 5 s away, unless woken."""
    n = len(steps)
    wait_until(lambda: len(steps) > n, timeout=3)


def test_maintenance_runs_often_only_while_the_limit_holds_callers_back(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "SLOW_BORROW", math.inf)  # keep the caller queued
    with small_pool(dsn, min_size=2, max_size=2, adaptive_concurrency=True) as pool:
        pool.wait(5)
        steps = count_maintenance(pool)
        after_a_step(steps)

        def steps_while_one_queues(window: float) -> int:
            """Lend both, queue a caller for `window` seconds, give back."""
            held = [pool.getconn() for _ in range(2)]  # no queue: lent

            def give_back() -> int:
                wait_until(lambda: pool.stats().waiting == 1)
                n = len(steps)
                asleep(window)
                for conn in held:
                    pool.putconn(conn)
                return len(steps) - n

            _, count = run_all([lambda: timed_borrow(pool), give_back])
            return int(count)

        # Every connection lent, callers queue: the usual pace.
        assert steps_while_one_queues(1.0) <= 1
        # The limit holds the caller back: woken at once, then a step every
        # WATCH_INTERVAL.
        hold_lending_to(pool, 1)
        assert steps_while_one_queues(1.0) >= 4
        # Nobody queues any more: the usual pace again.
        n = len(steps)
        asleep(1.0)
        assert len(steps) - n <= 1
        assert pool.stats().lend_limit == 1


def test_a_give_back_that_lowers_the_limit_wakes_the_maintenance(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "SLOW_BORROW", math.inf)  # keep the callers queued

    def ended(self: Any, now: float, held: float, counted: bool = True) -> bool:
        self.limit = self.floor  # as a probe of the floor would
        return True

    with small_pool(dsn, min_size=3, max_size=3, adaptive_concurrency=True) as pool:
        pool.wait(5)
        steps = count_maintenance(pool)
        after_a_step(steps)
        held = [pool.getconn() for _ in range(3)]

        def give_back() -> int:
            # Two callers queue while every connection may be lent: nothing
            # to watch yet. Then a give-back lowers the limit.
            wait_until(lambda: pool.stats().waiting == 2)
            monkeypatch.setattr(_adaptive.AdaptiveLimit, "ended", ended)
            n = len(steps)
            pool.putconn(held.pop())
            asleep(0.5)
            count = len(steps) - n
            for conn in held:
                pool.putconn(conn)
            return count

        *_, count = run_all(
            [lambda: timed_borrow(pool), lambda: timed_borrow(pool), give_back]
        )
        assert count >= 3


def test_adaptive_concurrency_under_load_loses_no_borrow(dsn: str) -> None:
    with small_pool(dsn, min_size=4, max_size=4, adaptive_concurrency=True) as pool:
        pool.wait(5)
        deadline = time.monotonic() + 1.5
        counts = [0] * 24

        def worker(i: int) -> None:
            while time.monotonic() < deadline:
                with pool.connection(timeout=10) as conn:
                    conn.execute("SELECT 1")
                counts[i] += 1

        run_all([lambda i=i: worker(i) for i in range(24)])
        stats = pool.stats()
        assert all(counts), counts
        assert stats.borrowed_total >= sum(counts)
        assert stats.in_use == stats.waiting == 0 and stats.idle == 4
        assert 1 <= stats.lend_limit <= 4


def test_open_wait_times_out_with_the_connection_error(dsn: str) -> None:
    bad = make_conninfo(dsn, port=free_port())
    pool = small_pool(bad, min_size=1)
    with pytest.raises(PoolTimeout, match="last connection error") as info:
        pool.open(wait=True, timeout=1)
    assert info.value.last_error
    pool.close()


# -- giving back --------------------------------------------------------------


def test_no_half_done_work_is_ever_committed(dsn: str, admin: Any) -> None:
    admin.execute("CREATE TABLE t (x int)")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pytest.raises(ZeroDivisionError):
            with pool.connection() as conn:
                conn.execute("INSERT INTO t VALUES (1)")
                1 / 0  # noqa: B018

        conn = pool.getconn()
        conn.execute("INSERT INTO t VALUES (2)")
        pool.putconn(conn)

        with pool.connection() as conn:
            conn.execute("INSERT INTO t VALUES (3)")
            cur = conn.execute("SELECT count(*) FROM t")
            assert cur.fetchone() == (1,)
    cur = admin.execute("SELECT x FROM t")
    assert cur.fetchall() == [(3,)]


def test_intrans_given_back_is_rolled_back_with_a_warning(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgwarden")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        pid = query_pid(conn)
        pool.putconn(conn)
        with pool.connection() as conn:
            assert query_pid(conn) == pid
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert any("inside a transaction" in r.getMessage() for r in caplog.records)


def test_failed_transaction_is_rolled_back_and_reused(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        pid = query_pid(conn)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        pool.putconn(conn)
        with pool.connection() as conn:
            assert query_pid(conn) == pid


def test_broken_connection_is_replaced(dsn: str, admin: Any) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pytest.raises(psycopg.OperationalError):
            with pool.connection() as conn:
                pid = query_pid(conn)
                admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
                conn.execute("SELECT 1")
        with pool.connection(timeout=5) as conn:
            assert query_pid(conn) != pid
        assert pool.stats().size == 1


def test_stale_handles_and_double_returns_raise(dsn: str) -> None:
    with small_pool(dsn) as pool, small_pool(dsn) as other:
        conn = pool.getconn()
        pool.putconn(conn)
        with pytest.raises(ConnectionReturned):
            conn.execute("SELECT 1")
        with pytest.raises(ConnectionReturned, match="not on loan"):
            pool.putconn(conn)
        assert "returned to the pool" in repr(conn)

        with pool.connection() as conn2:
            pass
        with pytest.raises(ConnectionReturned):
            conn2.execute("SELECT 1")

        foreign = other.getconn()
        with pytest.raises(ConnectionReturned, match="another pool"):
            pool.putconn(foreign)
        other.putconn(foreign)
        assert pool.stats().in_use == 0 and other.stats().in_use == 0

        with pytest.raises(ConnectionReturned, match="not on loan"):
            pool.putconn(psycopg.Connection.connect(dsn))


def test_a_kept_stale_handle_never_comes_back_to_life(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            pass
        stale = conn  # one reference kept, as `with ... as conn` in a loop does
        with pool.connection() as again:
            assert again is not stale
            assert query_pid(again)
            with pytest.raises(ConnectionReturned):
                stale.execute("SELECT 1")
        with pytest.raises(ConnectionReturned):
            stale.execute("SELECT 1")


def test_a_handle_cannot_be_copied(dsn: str) -> None:
    # A copy would not be detached by the give-back: it would run on the
    # next borrower's session.
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            with pytest.raises(TypeError, match="can't be copied"):
                copy.copy(conn)
            assert query_pid(conn)  # the loan is intact
        assert pool.stats().in_use == 0


def test_a_weak_reference_does_not_bring_a_returned_handle_back(
    dsn: str,
) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            pid = query_pid(conn)
            ref = weakref.ref(conn)
        del conn
        with pool.connection() as conn:
            assert query_pid(conn) == pid  # the same connection
            assert ref() is not conn


def test_a_connection_block_is_for_one_borrow(dsn: str) -> None:
    # Shared (by two tasks, say), a block's exit could give back the other
    # borrow's connection in the middle of its transaction.
    with small_pool(dsn, min_size=1, max_size=2) as pool:
        block = pool.connection()
        with block:
            with pytest.raises(RuntimeError, match="entered already"):
                with block:
                    pass
        with pytest.raises(RuntimeError, match="entered already"):
            with block:
                pass
        assert pool.stats().in_use == 0


def test_an_error_in_a_block_that_gave_its_connection_back_comes_through(
    dsn: str,
) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pytest.raises(ZeroDivisionError):
            with pool.connection() as conn:
                pool.putconn(conn)
                1 / 0  # noqa: B018
        with pytest.raises(ConnectionReturned):
            with pool.connection() as conn:
                pool.putconn(conn)
        assert pool.stats().in_use == 0


def test_a_server_error_in_a_stream_leaves_the_connection_usable(
    dsn: str,
) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            pid = query_pid(conn)
            cur = conn.cursor()
            with pytest.raises(psycopg.errors.DivisionByZero):
                for _ in cur.stream(
                    "SELECT 10 / (3 - x) FROM generate_series(1, 5) AS x"
                ):
                    pass
            assert not conn.closed
            conn.rollback()
            assert query_pid(conn) == pid


def test_a_failure_undoing_client_changes_closes_the_connection(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Any) -> None:
        raise KeyError("_prepared")

    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            first = query_pid(conn)
        monkeypatch.setattr(PooledConnection, "_pgw_restore", broken)
        with caplog.at_level(logging.WARNING, logger="pgwarden.pool"):
            with pool.connection() as conn:
                pass
        assert "undoing client-side changes" in caplog.text
        monkeypatch.undo()
        assert pool.stats().in_use == 0
        with pool.connection() as conn:
            assert query_pid(conn) != first  # a new one replaced it


def test_a_borrow_interrupted_before_hand_out_loses_no_slot(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = sys.modules[Pool.__module__]
    refcount = module.getrefcount  # called once the connection is taken

    def interrupted(obj: Any) -> int:
        monkeypatch.setattr(module, "getrefcount", refcount)  # once
        raise KeyboardInterrupt

    with small_pool(dsn, min_size=1, max_size=1) as pool:
        pool.wait()
        monkeypatch.setattr(module, "getrefcount", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pool.getconn()
        assert pool.stats().in_use == 0
        with pool.connection(timeout=5) as conn:  # its replacement
            assert query_pid(conn)


class InterruptedLock:
    """The pool's lock, with a KeyboardInterrupt landing next to its next
    acquire() or release(): `where` is "before acquire", "after acquire" or
    "after release"; None once it has fired."""

    def __init__(self, lock: Any, where: str) -> None:
        self.lock = lock
        self.where: str | None = where

    def acquire(self, *args: Any) -> bool:
        if self.where == "before acquire":
            self.where = None
            raise KeyboardInterrupt
        taken = self.lock.acquire(*args)
        if self.where == "after acquire":
            self.where = None
            raise KeyboardInterrupt
        return bool(taken)

    def release(self) -> None:
        self.lock.release()
        if self.where == "after release":
            self.where = None
            raise KeyboardInterrupt

    def _is_owned(self) -> bool:
        return bool(self.lock._is_owned())

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@pytest.mark.parametrize("where", ["before acquire", "after acquire", "after release"])
def test_an_interrupt_next_to_the_lock_never_leaves_it_held(
    dsn: str, where: str
) -> None:
    # The borrow and the give-back take the lock without `with`: wherever
    # Ctrl-C lands, the lock is free afterwards and the pool serves on.
    with small_pool(dsn, min_size=2, max_size=2) as pool:
        pool.wait()
        lock = pool._lock
        pool._lock = InterruptedLock(lock, where)  # type: ignore[assignment]
        with pytest.raises(KeyboardInterrupt):
            pool.getconn()
        assert not lock._is_owned()
        assert pool.stats().in_use == 0
        with pytest.raises(KeyboardInterrupt):
            with pool.connection():  # now the give-back
                pool._lock = InterruptedLock(lock, where)  # type: ignore[assignment]
        assert not lock._is_owned()
        pool._lock = lock
        # Interrupted before it took the loan back, the give-back left the
        # connection to its handle: the pool reclaims it once that is collected.
        assert pool.stats().in_use == (0 if where == "after release" else 1)
        with pool.connection(timeout=5) as conn:
            assert query_pid(conn)


@pytest.mark.parametrize("where", ["after acquire", "after release"])
def test_an_interrupt_next_to_the_lock_leaves_no_waiter_behind(
    dsn: str, where: str
) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        held = pool.getconn()
        lock = pool._lock
        pool._lock = InterruptedLock(lock, where)  # type: ignore[assignment]
        with pytest.raises(KeyboardInterrupt):
            pool.getconn()  # queued, if the interrupt came after
        pool._lock = lock
        pool.putconn(held)
        stats = pool.stats()
        assert (stats.waiting, stats.in_use, stats.idle) == (0, 0, 1)


def test_an_interrupted_give_back_still_wakes_the_next_waiter(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Served but never woken, the waiter would sleep until its wait chunk ends.
    monkeypatch.setattr(_core, "FAST_FAIL_WAIT", 60.0)
    with small_pool(dsn, min_size=1, max_size=1, connection_timeout=60) as pool:
        lock = pool._lock

        def waiter() -> float:
            wait_until(lambda: pool.stats().in_use == 1)
            with pool.connection() as conn:
                query_pid(conn)
            return time.monotonic()

        def giver() -> float:
            with pytest.raises(KeyboardInterrupt):
                with pool.connection():
                    wait_until(lambda: pool.stats().waiting == 1)
                    pool._lock = InterruptedLock(lock, "after release")  # type: ignore[assignment]
            return time.monotonic()

        served, given = run_all([waiter, giver])
        assert served - given < 10
        pool._lock = lock
        assert pool.stats().idle == 1


def test_handle_is_a_real_psycopg_connection(dsn: str) -> None:
    with small_pool(dsn) as pool, pool.connection() as conn:
        assert isinstance(conn, psycopg.Connection)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        with conn.transaction():
            conn.execute("SELECT 1")


def test_copy_and_streaming_through_a_pooled_connection(dsn: str) -> None:
    # Several megabytes each way: many waits, for reading and for writing.
    n = 50_000
    with small_pool(dsn, min_size=1, max_size=1, query_timeout=30) as pool:
        with pool.connection() as conn:
            conn.execute("CREATE TEMP TABLE copied (id int, pad text)")
            with conn.cursor().copy("COPY copied FROM STDIN") as copy:
                for i in range(n):
                    copy.write_row((i, "x" * 100))
            out = []
            with conn.cursor().copy("COPY copied TO STDOUT") as copy:
                for row in copy.rows():
                    out.append(row)
            assert len(out) == n
            assert out[-1] == (str(n - 1), "x" * 100)
            cur = conn.cursor()
            total = 0
            for (value,) in cur.stream("SELECT generate_series(1, 20000)"):
                total += value
            assert total == 20000 * 20001 // 2


def test_client_side_settings_do_not_leak_to_the_next_borrower(dsn: str) -> None:
    class Mine(psycopg.ServerCursor[Any]):
        pass

    with small_pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            conn.set_read_only(True)
            conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
            conn.set_deferrable(True)
            conn.execute("SELECT 1")  # psycopg keeps the BEGIN it made
            conn.row_factory = dict_row
            conn.server_cursor_factory = Mine
            conn.commit()
            conn.set_autocommit(True)
        with pool.connection() as conn:
            assert not conn.autocommit and conn.read_only is None
            assert conn.isolation_level is None and conn.deferrable is None
            cur = conn.execute(
                "SELECT 1 AS one, current_setting('transaction_isolation'),"
                " current_setting('transaction_read_only'),"
                " current_setting('transaction_deferrable')"
            )
            assert cur.fetchone() == (1, "read committed", "off", "off")
            assert type(conn.cursor("named")) is psycopg.ServerCursor


def test_reset_query_clears_session_state(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=1, reset_query="DISCARD ALL") as pool:
        with pool.connection() as conn:
            conn.execute("SET TIME ZONE 'Asia/Tokyo'")
            conn.execute("CREATE TEMP TABLE scratch (x int)")
            conn.execute("SELECT pg_advisory_lock(42)")
            pid = query_pid(conn)
        with pool.connection() as conn:
            assert query_pid(conn) == pid  # the same session, cleaned
            cur = conn.execute(
                "SELECT current_setting('TimeZone'),"
                " to_regclass('pg_temp.scratch') IS NULL,"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                "  AND pid = pg_backend_pid())"
            )
            assert cur.fetchone() == ("UTC", True, 0)


# -- leaks ----------------------------------------------------------------------


def test_leak_warning_names_the_place_and_the_return(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgwarden")
    with small_pool(dsn, leak_detection_threshold=0.2) as pool:
        line = sys._getframe().f_lineno + 1
        conn = pool.getconn()

        def warned() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if "possible connection leak" in r.getMessage()
            ]

        (msg,) = wait_until(warned, message="a leak warning")
        here = msg.replace("test_pool.py", "test_pool_async.py")
        assert f"test_pool_async.py:{line} in test_leak_warning" in here
        assert "leak_detection_threshold=0.2 s" in msg
        assert "held for" in msg and "lane 'default'" in msg
        assert pool.stats().leaks_total == 1
        pool.putconn(conn)
        assert any("was given back after" in r.getMessage() for r in caplog.records)


def test_garbage_collected_handle_is_reclaimed(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute("CREATE TABLE t (x int)")
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        conn = pool.getconn()
        conn.execute("INSERT INTO t VALUES (1)")
        del conn
        gc.collect()
        wait_until(lambda: pool.stats().reclaimed_total == 1)
        with pool.connection(timeout=5) as conn:
            conn.execute("SELECT 1")
        assert any("garbage collected" in r.getMessage() for r in caplog.records)
    assert admin.execute("SELECT count(*) FROM t").fetchone() == (0,)


# -- lanes ----------------------------------------------------------------------


def test_unknown_lane_is_a_value_error(dsn: str) -> None:
    with small_pool(dsn, lanes="a:1:2") as pool:
        with pytest.raises(UnknownLane, match="'b'") as info:
            pool.getconn(lane="b")
        assert isinstance(info.value, ValueError)


def test_lane_limit_and_reservation(dsn: str) -> None:
    with small_pool(dsn, min_size=0, max_size=4, lanes="a:2:3,b:1:2") as pool:
        a = [pool.getconn(lane="a", timeout=5) for _ in range(3)]
        # a is at its limit: it waits even though the pool could open more.
        with pytest.raises(PoolTimeout, match="limit of 3"):
            pool.getconn(lane="a", timeout=0.2)
        # b's reservation is still there for it...
        b = [pool.getconn(lane="b", timeout=5)]
        # ...but the one shared connection is taken by a: b and default wait.
        with pytest.raises(PoolTimeout):
            pool.getconn(lane="b", timeout=0.2)
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
        lanes = pool.stats().lanes
        assert (lanes["a"].in_use, lanes["b"].in_use, lanes["default"].in_use) == (
            3,
            1,
            0,
        )
        # When a gives back its shared connection, b may take it.
        pool.putconn(a.pop())
        b.append(pool.getconn(lane="b", timeout=5))
        for conn in a + b:
            pool.putconn(conn)


def test_reserved_lane_is_served_while_others_saturate(dsn: str) -> None:
    with small_pool(dsn, min_size=4, max_size=6, lanes="calls:2:2,api:0:6") as pool:
        pool.wait(5)
        stop = Event()
        waits: list[float] = []

        def hammer(lane: str) -> Callable[[], Any]:
            def run() -> None:
                while not stop.is_set():
                    try:
                        t0 = time.monotonic()
                        with pool.connection(lane=lane, timeout=2) as conn:
                            if lane == "calls":
                                waits.append(time.monotonic() - t0)
                            conn.execute("SELECT pg_sleep(0.01)")
                            lanes = pool.stats().lanes
                            assert lanes["calls"].in_use <= 2
                            assert lanes["api"].in_use <= 4  # 6 minus calls' 2
                    except PoolTimeout:
                        assert lane == "api"  # api may time out; calls must not

            return run

        def stopper() -> None:
            wait_until(lambda: len(waits) >= 30, timeout=20)
            stop.set()

        run_all([hammer("api") for _ in range(12)] + [hammer("calls")] + [stopper])
        # The calls lane never queued behind api: it had its own connections.
        assert max(waits) < 0.5, max(waits)


# -- server faults --------------------------------------------------------------


def test_server_restart_under_load(dsn: str, pg_server: Any) -> None:
    with small_pool(dsn, min_size=2, max_size=4, connection_timeout=2) as pool:
        pool.wait(5)
        stop = Event()
        ok_after: list[float] = []
        errors: list[BaseException] = []
        restarted_at: list[float] = []

        def worker() -> Callable[[], Any]:
            def run() -> None:
                while not stop.is_set():
                    try:
                        with pool.connection() as conn:
                            conn.execute("SELECT 1")
                        if restarted_at:
                            ok_after.append(time.monotonic())
                    except psycopg.OperationalError as ex:
                        errors.append(ex)
                        asleep(0.01)

            return run

        def restarter() -> None:
            wait_until(lambda: pool.stats().borrowed_total > 50)
            run_blocking(pg_server.restart, "fast")
            restarted_at.append(time.monotonic())
            wait_until(lambda: len(ok_after) > 20, timeout=15)
            stop.set()

        t0 = time.monotonic()
        run_all([worker() for _ in range(6)] + [restarter])
        assert time.monotonic() - t0 < 30
        wait_until(lambda: pool.stats().size >= 2 and pool.stats().idle >= 2)
        stats = pool.stats()
        assert stats.in_use == 0 and stats.waiting == 0 and stats.size <= 4


def test_server_down_fails_fast_then_recovers(dsn: str, pg_server: Any) -> None:
    with small_pool(dsn, min_size=2, max_size=2, connection_timeout=10) as pool:
        pool.wait(5)
        run_blocking(pg_server.stop, "fast")
        try:
            # The pool finds out, then callers stop piling up for 10 s.
            wait_until(lambda: pool.stats().server_down, timeout=10)
            t0 = time.monotonic()
            with pytest.raises(PoolTimeout, match="unreachable") as info:
                pool.getconn()
            assert time.monotonic() - t0 < 2.0
            assert info.value.last_error
        finally:
            run_blocking(pg_server.start)
        wait_until(lambda: pool.stats().idle == 2, timeout=10)
        with pool.connection(timeout=5) as conn:
            conn.execute("SELECT 1")
        assert not pool.stats().server_down


def test_callers_arriving_together_all_fail_fast_while_the_server_is_down(
    dsn: str,
) -> None:
    bad = make_conninfo(dsn, port=free_port())
    with small_pool(bad, min_size=1, max_size=2, connection_timeout=10) as pool:
        wait_until(lambda: pool.stats().server_down, timeout=10)

        def borrow(after: float) -> float:
            asleep(after)
            t0 = time.monotonic()
            with pytest.raises(PoolTimeout, match="unreachable"):
                pool.getconn()
            return time.monotonic() - t0

        # Close together: each still fails about a second after it came.
        waited = run_all([lambda i=i: borrow(i * 0.0005) for i in range(20)])
        assert max(waited) < 1.8, sorted(waited)


# -- lifecycle ------------------------------------------------------------------


def test_close_fails_waiters_and_closes_everything(dsn: str, admin: Any) -> None:
    pool = small_pool(dsn, min_size=2, max_size=2)
    app = pool.config.application_name
    pool.open(wait=True)
    held = [pool.getconn(), pool.getconn()]
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.getconn(timeout=10)
        except PoolClosed as ex:
            outcome.append(ex)

    def closer() -> None:
        wait_until(lambda: pool.stats().waiting == 1)
        pool.close(timeout=0.5)

    run_all([waiter, closer])
    assert len(outcome) == 1
    # The two connections still on loan were cut off: their backends are gone.
    wait_until(lambda: not backend_pids(admin, app), message="no backends left")
    with pytest.raises(psycopg.OperationalError):
        held[0].execute("SELECT 1")
    pool.putconn(held[0])
    assert pool.stats().size == 1


def test_resize(dsn: str, admin: Any) -> None:
    with small_pool(dsn, min_size=1, max_size=2) as pool:
        app = pool.config.application_name
        pool.resize(3, 5)
        wait_until(lambda: pool.stats().size == 3)
        assert pool.stats().max_size == 5
        pool.resize(1, 1)
        wait_until(lambda: len(backend_pids(admin, app)) == 1)
        with pytest.raises(ConfigError):
            pool.resize(3, 2)


def test_stats_fields(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=2, lanes="x:1:1") as pool:
        with pool.connection(lane="x"):
            stats = pool.stats()
            assert stats.in_use == 1 and stats.lanes["x"].in_use == 1
            assert stats.longest_held_seconds >= 0
            assert stats.lend_limit == 2  # max_size, until callers queue
        d = pool.stats().as_dict()
        for key in (
            "size",
            "idle",
            "in_use",
            "waiting",
            "lanes",
            "borrowed_total",
            "timeouts_total",
            "validation_failures_total",
            "evictions_total",
            "leaks_total",
            "longest_held_seconds",
            "wait_p50_seconds",
            "wait_p99_seconds",
        ):
            assert key in d
        assert d["lanes"]["x"] == {"in_use": 0, "waiting": 0, "reserved": 1, "limit": 1}


def test_describe_tells_who_holds_what(dsn: str) -> None:
    with small_pool(dsn, min_size=2, max_size=2, lanes="x:1:2") as pool:
        pool.wait(5)
        line = sys._getframe().f_lineno + 1
        conn = pool.getconn(lane="x")
        (held, idle) = pool.describe()
        assert held.pid == conn.info.backend_pid and held.state == "in_use"
        assert held.lane == "x" and held.held_seconds is not None
        assert held.acquired_at is not None
        site = held.acquired_at.replace("test_pool.py", "test_pool_async.py")
        assert f"test_pool_async.py:{line} in test_describe" in site
        assert held.holder and not held.leak_suspected
        assert idle.state == "idle" and idle.lane is None and idle.held_seconds is None
        pool.putconn(conn)
        assert all(c.state == "idle" for c in pool.describe())


def test_describe_names_the_line_of_a_connection_block(dsn: str) -> None:
    with small_pool(dsn, min_size=1, max_size=1) as pool:
        line = sys._getframe().f_lineno + 1
        with pool.connection():
            (held,) = pool.describe()
            assert held.acquired_at is not None
            site = held.acquired_at.replace("test_pool.py", "test_pool_async.py")
            assert f"test_pool_async.py:{line} in test_describe_names" in site


def test_password_never_shown(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Sup3r-S3cret-pw"
    bad = make_conninfo(dsn, password=secret, port=free_port())
    pool = small_pool(bad, min_size=1)
    assert secret not in repr(pool) and secret not in repr(pool.config)
    pool.open()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn(timeout=0.5)
    assert secret not in str(info.value)
    assert secret not in str(pool.stats())
    pool.close()
    assert caplog.records and secret not in caplog.text


# -- stress ---------------------------------------------------------------------


def test_random_stress_single_owner_and_counts_add_up(dsn: str, admin: Any) -> None:
    rng = random.Random(20261127)
    with small_pool(
        dsn, min_size=1, max_size=5, lanes="a:1:3,b:1:4", max_waiting=0
    ) as pool:
        app = pool.config.application_name
        owner: dict[int, int] = {}

        def worker(n: int) -> Callable[[], Any]:
            def run() -> tuple[int, int]:
                ok = timeouts = 0
                for _ in range(40):
                    lane = rng.choice(["a", "b", None])
                    try:
                        conn = pool.getconn(lane=lane, timeout=rng.choice([0.05, 2]))
                    except PoolTimeout:
                        timeouts += 1
                        continue
                    pid = conn.info.backend_pid
                    assert pid not in owner, f"{pid} handed to {owner[pid]} and {n}"
                    owner[pid] = n
                    try:
                        conn.execute("SELECT 1")
                        if rng.random() < 0.2:
                            conn.execute("SELECT 1 / 0")
                        if rng.random() < 0.3:
                            asleep(rng.random() * 0.01)
                    except psycopg.errors.DivisionByZero:
                        pass
                    finally:
                        del owner[pid]
                        pool.putconn(conn)
                    ok += 1
                    stats = pool.stats()
                    assert stats.size <= 5
                    assert stats.lanes["a"].in_use <= 3 and stats.lanes["b"].in_use <= 4
                return ok, timeouts

            return run

        results = run_all([worker(n) for n in range(16)])
        ok = sum(r[0] for r in results)
        stats = pool.stats()
        assert stats.in_use == 0 and stats.waiting == 0
        assert stats.borrowed_total == ok
        assert stats.timeouts_total == sum(r[1] for r in results)
        assert ok > 300
        wait_until(lambda: len(backend_pids(admin, app)) == pool.stats().size)
