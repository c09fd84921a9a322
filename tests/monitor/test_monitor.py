"""HealthMonitor against a real server: each cause gives its alert, and it clears."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgwarden import AsyncPool, HealthMonitor, MonitorSettings, Pool, PoolTimeout
from pgwarden.monitor import AlertEvent, EventKind, Severity
from tests._util import wait_until
from tests.pool._helpers import free_port, unique_app

# Defaults that keep alerts off unless a test turns one on.
QUIET = {
    "warn_pool_in_use": 1000,
    "warn_active_connections": 1000,
    "warn_idle_in_transaction": 3600,
    "long_query_threshold": 3600,
    "lock_wait_threshold": 3600,
    "warn_usage_ratio": 0.99,
    "critical_usage_ratio": 1.0,
}


class Recorder:
    def __init__(self) -> None:
        self.events: list[AlertEvent] = []

    def __call__(self, event: AlertEvent) -> None:
        self.events.append(event)

    def kinds(self, key: str) -> list[str]:
        return [str(e.kind) for e in self.events if e.alert.key == key]


def make_monitor(
    dsn: str, *pools: Any, **thresholds: Any
) -> tuple[HealthMonitor, Recorder]:
    recorder = Recorder()
    settings = MonitorSettings(**{**QUIET, **thresholds})
    monitor = HealthMonitor(dsn, pools=pools, settings=settings, sinks=[recorder])
    return monitor, recorder


@pytest.fixture
def pool(dsn: str) -> Iterator[Pool]:
    with Pool(
        dsn,
        name="api",
        min_size=1,
        max_size=3,
        lanes="frontend:0:1,calls:1:2",
        application_name=unique_app(),
        connection_timeout=5,
    ) as pool:
        pool.wait(5)
        yield pool


def check_for(monitor: HealthMonitor, key: str) -> Any:
    """Run a check; return the active alert with `key`, or None."""
    return {a.key: a for a in monitor.check().alerts}.get(key)


def test_idle_in_transaction_is_attributed_to_the_borrower(
    dsn: str, pool: Pool
) -> None:
    monitor, rec = make_monitor(dsn, pool, warn_idle_in_transaction=0.2)
    conn = pool.getconn(lane="frontend")
    conn.execute("SELECT 1")  # opens a transaction, then sits idle
    a = wait_until(lambda: check_for(monitor, "server.idle_in_transaction"))
    assert a.severity == Severity.WARNING
    assert f"pid {conn.info.backend_pid}" in a.message
    assert "pool api, lane frontend" in a.message
    assert "acquired at tests/monitor/test_monitor.py" in a.message
    (session,) = a.details["sessions"]
    assert session["attribution"]["lane"] == "frontend"
    pool.putconn(conn)
    monitor.check()
    assert rec.kinds("server.idle_in_transaction") == ["fired", "resolved"]


def test_leak_alert_names_the_site(dsn: str, dsn_pool_leaky: Pool) -> None:
    monitor, rec = make_monitor(dsn, dsn_pool_leaky)
    conn = dsn_pool_leaky.getconn()
    a = wait_until(lambda: check_for(monitor, "pool.leaky.leaks"))
    assert "acquired at tests/monitor/test_monitor.py" in a.message
    assert a.details["connections"][0]["pid"] == conn.info.backend_pid
    dsn_pool_leaky.putconn(conn)
    monitor.check()
    assert rec.kinds("pool.leaky.leaks") == ["fired", "resolved"]


@pytest.fixture
def dsn_pool_leaky(dsn: str) -> Iterator[Pool]:
    with Pool(
        dsn, name="leaky", min_size=1, max_size=2, leak_detection_threshold=0.2
    ) as p:
        yield p


def test_long_query_and_active_connections(dsn: str, admin: Any) -> None:
    monitor, rec = make_monitor(
        dsn, long_query_threshold=0.2, warn_active_connections=0
    )

    def sleeper() -> None:
        with psycopg.connect(dsn, application_name="sleeper") as conn:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")

    thread = threading.Thread(target=sleeper, daemon=True)
    thread.start()
    a = wait_until(lambda: check_for(monitor, "server.long_queries"))
    assert "sleeper" in a.message and "1 query running" in a.message
    assert monitor.latest is not None
    assert "server.active_connections" in {a.key for a in monitor.latest.alerts}
    admin.execute(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'sleeper'"
    )
    thread.join(10)
    monitor.check()
    assert rec.kinds("server.long_queries") == ["fired", "resolved"]
    assert rec.kinds("server.active_connections") == ["fired", "resolved"]


def test_lock_wait_names_the_root_blocker(dsn: str, admin: Any) -> None:
    admin.execute("CREATE TABLE t (x int)")
    monitor, rec = make_monitor(dsn, lock_wait_threshold=0.2)
    blocker = psycopg.connect(dsn, application_name="blocker")
    blocker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")

    def waiter() -> None:
        with psycopg.connect(dsn, application_name="waiter", autocommit=True) as conn:
            conn.execute("SELECT * FROM t")

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    a = wait_until(lambda: check_for(monitor, "server.lock_waits"))
    assert a.details["root_blockers"] == [blocker.info.backend_pid]
    assert "blocker" in a.message
    blocker.rollback()
    thread.join(10)
    blocker.close()
    monitor.check()
    assert rec.kinds("server.lock_waits") == ["fired", "resolved"]


def test_exhausted_lane_and_pool_timeouts(dsn: str, pool: Pool) -> None:
    monitor, rec = make_monitor(dsn, pool)
    monitor.check()  # remembers the timeout counter
    held = pool.getconn(lane="frontend")  # frontend's limit is 1
    waiting = threading.Thread(
        target=lambda: pool.putconn(pool.getconn(lane="frontend", timeout=10))
    )
    waiting.start()
    wait_until(lambda: pool.stats().lanes["frontend"].waiting == 1)
    with pytest.raises(PoolTimeout):
        pool.getconn(lane="frontend", timeout=0.05)
    report = monitor.check()
    keys = {a.key: a for a in report.alerts}
    assert "pool.api.lane.frontend.exhausted" in keys
    assert keys["pool.api.timeouts"].severity == Severity.CRITICAL
    pool.putconn(held)
    waiting.join(10)
    monitor.check()
    assert rec.kinds("pool.api.lane.frontend.exhausted") == ["fired", "resolved"]
    assert rec.kinds("pool.api.timeouts") == ["fired", "resolved"]


def test_pool_in_use_and_exhausted_pool_is_not_ready(dsn: str, pool: Pool) -> None:
    monitor, rec = make_monitor(dsn, pool, warn_pool_in_use=1)
    held = [pool.getconn(lane="calls"), pool.getconn(lane="calls"), pool.getconn()]
    waiting = threading.Thread(target=lambda: pool.putconn(pool.getconn(timeout=10)))
    waiting.start()
    wait_until(lambda: pool.stats().waiting == 1)
    report = monitor.check()
    keys = {a.key for a in report.alerts}
    assert {"pool.api.in_use", "pool.api.exhausted"} <= keys
    assert report.readiness() == (False, "pool exhausted: api")
    # The monitor still reads the server: it never borrows from the pool.
    assert report.server is not None
    for conn in held:
        pool.putconn(conn)
    waiting.join(10)
    report = monitor.check()
    assert report.readiness() == (True, "ok")
    assert rec.kinds("pool.api.exhausted") == ["fired", "resolved"]


def test_usage_thresholds(dsn: str) -> None:
    monitor, _ = make_monitor(dsn, warn_usage_ratio=0.0001, critical_usage_ratio=0.0002)
    extra = [psycopg.connect(dsn) for _ in range(2)]
    try:
        report = monitor.check()
    finally:
        for conn in extra:
            conn.close()
    (a,) = [a for a in report.alerts if a.key == "server.usage"]
    assert a.severity == Severity.CRITICAL
    assert a.details["usable"] == report.server.usable_connections  # type: ignore[union-attr]


def test_server_going_away_is_critical_and_recovers(dsn: str, pg_server: Any) -> None:
    monitor, rec = make_monitor(dsn)
    assert monitor.check().server is not None
    pg_server.stop()
    try:
        report = monitor.check()
        assert report.server is None and report.server_error
        (a,) = [a for a in report.alerts if a.key == "server.unreachable"]
        assert a.severity == Severity.CRITICAL
        assert not report.healthy and report.readiness()[0] is False
    finally:
        pg_server.start()
    report = monitor.check()  # the lost monitor connection is re-made
    assert report.server is not None and report.healthy
    assert rec.kinds("server.unreachable") == ["fired", "resolved"]
    monitor.stop()


def test_monitor_reconnects_when_its_session_is_killed(dsn: str, admin: Any) -> None:
    monitor, rec = make_monitor(dsn)
    monitor.check()
    admin.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
        " WHERE application_name = 'pgwarden-monitor'"
    )
    report = monitor.check()
    assert report.server is not None
    assert monitor.check_errors_total == 1
    assert not rec.events  # a re-made connection is not an outage
    monitor.stop()


def test_monitor_session_is_short_fused(dsn: str) -> None:
    monitor, _ = make_monitor(dsn)
    monitor.check()
    assert monitor._conn is not None
    row = monitor._conn.execute(
        "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
        " current_setting('application_name')"
    ).fetchone()
    assert row == ("5s", "1s", "pgwarden-monitor")
    monitor.stop()


def test_background_checks_and_context_manager(dsn: str) -> None:
    monitor, _ = make_monitor(dsn, health_check_interval=0.05)
    with monitor:
        assert monitor.running
        wait_until(lambda: monitor.checks_total >= 3)
    assert not monitor.running


def test_ordinary_role_without_pg_monitor_is_told(
    dsn: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    role = unique_app().replace("-", "_")
    admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        monitor, _ = make_monitor(make_conninfo(dsn, user=role))
        with caplog.at_level(logging.WARNING, logger="pgwarden.health"):
            report = monitor.check()
            monitor.check()
        assert report.server is not None and report.server.visibility_note
        assert "pg_monitor" in report.server.visibility_note
        notes = [r for r in caplog.records if "pg_monitor" in r.getMessage()]
        assert len(notes) == 1  # said once, not at every check
        monitor.stop()
    finally:
        admin.execute(f'DROP ROLE "{role}"')


async def test_works_beside_an_async_pool(dsn: str) -> None:
    async with AsyncPool(dsn, name="aio", min_size=1, max_size=2) as pool:
        monitor, _ = make_monitor(dsn, pool, warn_idle_in_transaction=0.1)
        conn = await pool.getconn()
        await conn.execute("SELECT 1")

        def attributed() -> bool:
            report = monitor.check()
            return any(
                s.attribution is not None and s.attribution.pool == "aio"
                for s in report.server.idle_in_transaction  # type: ignore[union-attr]
            )

        await asyncio.to_thread(wait_until, attributed)
        await pool.putconn(conn)
        monitor.stop()


def test_no_password_in_report_or_logs(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Mon1tor-S3cret"
    bad = make_conninfo(dsn, password=secret, port=free_port())
    caplog.set_level(logging.DEBUG)
    monitor, rec = make_monitor(bad)
    report = monitor.check()
    assert report.server is None
    text = json.dumps(report.to_dict()) + repr(monitor) + caplog.text
    text += json.dumps([e.to_dict() for e in rec.events])
    assert secret not in text
    assert rec.kinds("server.unreachable") == [str(EventKind.FIRED)]
    monitor.stop()
