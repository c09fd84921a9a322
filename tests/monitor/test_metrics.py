"""Prometheus metrics of the health monitor, scraped and parsed as Prometheus
would, against the real server; the documented list and the alert rules file
are checked against what is exported."""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

from pgwarden import HealthMonitor, MonitorSettings, Pool
from pgwarden.pool._core import WAIT_BUCKETS
from pgwarden.pool.stats import ConnectionInfo, PoolStats

from .._util import wait_until

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs" / "metrics.md"
RULES = ROOT / "contrib" / "prometheus" / "pgwarden-alerts.yml"
LANES = {"web": (1, 3), "jobs": (0, 2)}
PASSWORD = "S3cret-metrics-7f3a"

# A documented metric: | `name` | type | `label`, `label` | meaning |
_DOC_ROW = re.compile(r"^\| `(pgwarden_\w+)` \| (\w+) \|([^|]*)\|", re.MULTILINE)


class Scrape:
    """One scrape of a monitor's registry, parsed by prometheus_client."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self.text = generate_latest(monitor.registry).decode()
        self.families = list(text_string_to_metric_families(self.text))
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for f in self.families
            for s in f.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def buckets(self, pool: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a pool's wait histogram, in order."""
        out = []
        for (name, frozen), value in self.samples.items():
            labels = dict(frozen)
            if name.endswith("_wait_seconds_bucket") and labels["pool"] == pool:
                out.append((float(labels["le"]), value))
        return sorted(out)


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """Name: (type, labels) of each metric in docs/metrics.md."""
    return {
        m[1]: (m[2], frozenset(re.findall(r"`(\w+)`", m[3])))
        for m in _DOC_ROW.finditer(DOCS.read_text())
    }


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def lock_waits(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def pool(dsn: str) -> Iterator[Pool]:
    pool = Pool(dsn, name="app", min_size=1, max_size=4, lanes=LANES)
    pool.open(wait=True)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def monitor(dsn: str, pool: Pool) -> Iterator[HealthMonitor]:
    monitor = HealthMonitor(dsn, pools=[pool], settings=MonitorSettings())
    try:
        yield monitor
    finally:
        monitor.stop()


def borrow(pool: Pool, times: int = 3) -> None:
    for lane in ("web", "jobs", None)[:times]:
        with pool.connection(lane) as conn:
            conn.execute("SELECT 1")


def test_exported_metrics_are_the_documented_ones(
    pool: Pool, monitor: HealthMonitor
) -> None:
    borrow(pool)
    monitor.check()
    scrape = Scrape(monitor)

    exported = {}
    for family in scrape.families:
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        exported[name] = (family.type, frozenset(labels))
        assert family.samples, f"{name} has no sample"
    assert exported == documented()


def test_pool_and_lane_metrics(pool: Pool, monitor: HealthMonitor) -> None:
    borrow(pool)
    with pool.connection("web"):
        scrape, stats = Scrape(monitor), pool.stats()
    states = {
        state: scrape("pgwarden_pool_connections", pool="app", state=state)
        for state in ("idle", "in_use", "checking", "opening")
    }
    assert states["in_use"] == 1
    assert sum(states.values()) == stats.size
    assert scrape("pgwarden_pool_min_connections", pool="app") == 1
    assert scrape("pgwarden_pool_max_connections", pool="app") == 4
    assert scrape("pgwarden_pool_lend_limit", pool="app") == 4
    assert scrape("pgwarden_pool_waiting_callers", pool="app") == 0
    assert scrape("pgwarden_pool_longest_held_seconds", pool="app") >= 0
    assert scrape("pgwarden_pool_leaked_connections", pool="app") == 0
    assert scrape("pgwarden_pool_server_up", pool="app") == 1
    assert scrape("pgwarden_pool_timeouts_total", pool="app") == 0
    opened = scrape("pgwarden_pool_connections_opened_total", pool="app")
    assert opened == stats.connections_opened_total >= 1

    lane = {"pool": "app", "lane": "web"}
    assert scrape("pgwarden_lane_connections_in_use", **lane) == 1
    assert scrape("pgwarden_lane_waiting_callers", **lane) == 0
    for name, (reserved, limit) in LANES.items():
        lane = {"pool": "app", "lane": name}
        assert scrape("pgwarden_lane_reserved_connections", **lane) == reserved
        assert scrape("pgwarden_lane_max_connections", **lane) == limit
    default = {"pool": "app", "lane": "default"}
    limit = stats.lanes["default"].limit
    assert scrape("pgwarden_lane_max_connections", **default) == limit


def test_acquire_wait_histogram(pool: Pool, monitor: HealthMonitor) -> None:
    held = [pool.getconn("web") for _ in range(3)]  # the lane's limit
    served: list[Any] = []
    waiter = threading.Thread(
        target=lambda: served.append(pool.getconn("web", timeout=5))
    )
    waiter.start()
    wait_until(lambda: pool.stats().lanes["web"].waiting == 1, message="a waiter")
    pool.putconn(held.pop())
    waiter.join(5)
    for conn in held + served:
        pool.putconn(conn)

    scrape, stats = Scrape(monitor), pool.stats()
    buckets = scrape.buckets("app")
    assert [bound for bound, _ in buckets] == list(WAIT_BUCKETS)
    counts = [count for _, count in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == stats.borrowed_total == 4
    assert scrape("pgwarden_pool_acquire_wait_seconds_count", pool="app") == 4
    assert counts[0] < 4  # the waiter did wait
    total = scrape("pgwarden_pool_acquire_wait_seconds_sum", pool="app")
    assert total == pytest.approx(pool.stats().wait_sum_seconds) and total > 0


def test_server_metrics(
    dsn: str, admin: psycopg.Connection[Any], monitor: HealthMonitor
) -> None:
    admin.execute("CREATE TABLE t ()")
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn) as waiter:
        holder.execute("LOCK TABLE t")  # then idle in transaction
        blocked = threading.Thread(target=waiter.execute, args=["LOCK TABLE t"])
        blocked.start()
        wait_until(lambda: lock_waits(admin) == 1, message="a lock wait")
        report = monitor.check()
        scrape = Scrape(monitor)
        holder.rollback()
        blocked.join(5)
    server = report.server
    assert server is not None

    assert scrape("pgwarden_server_up") == 1
    row = admin.execute("SHOW max_connections").fetchone()
    assert row is not None
    assert scrape("pgwarden_server_max_connections") == int(row[0])
    usable = scrape("pgwarden_server_usable_connections")
    used = scrape("pgwarden_server_used_connections")
    assert 0 < usable <= int(row[0])
    assert used >= 4  # the pool's connection, admin, holder, waiter
    ratio = scrape("pgwarden_server_connection_usage_ratio")
    assert 0 < ratio < 1
    assert ratio == pytest.approx(used / usable)

    by_state = {
        dict(labels)["state"]: value
        for (name, labels), value in scrape.samples.items()
        if name == "pgwarden_server_connections"
    }
    assert by_state["idle in transaction"] == 1
    assert sum(by_state.values()) == len(server.sessions)
    assert by_state["active"] == 1  # the waiter
    assert scrape("pgwarden_server_idle_in_transaction_sessions") == 1
    assert scrape("pgwarden_server_oldest_transaction_seconds") > 0
    assert scrape("pgwarden_server_oldest_idle_in_transaction_seconds") > 0
    assert scrape("pgwarden_server_longest_query_seconds") > 0
    assert scrape("pgwarden_server_long_queries") == 0  # not for 30 s
    assert scrape("pgwarden_server_lock_waits") == 1
    assert scrape("pgwarden_server_longest_lock_wait_seconds") > 0

    assert scrape("pgwarden_monitor_checks_total") == monitor.checks_total == 1
    assert scrape("pgwarden_monitor_check_errors_total") == 0
    assert scrape("pgwarden_monitor_check_duration_seconds") == report.check_seconds
    last_check = scrape("pgwarden_monitor_last_check_timestamp_seconds")
    assert last_check == report.taken_at.timestamp()
    assert scrape("pgwarden_monitor_check_interval_seconds") == 30


def test_server_down(dsn: str) -> None:
    conninfo = make_conninfo(
        dsn, host="127.0.0.1", port=closed_port(), password=PASSWORD
    )
    monitor = HealthMonitor(conninfo, settings=MonitorSettings())
    try:
        before = Scrape(monitor)
        monitor.check()
        scrape = Scrape(monitor)
    finally:
        monitor.stop()

    assert not {n for n in before.names() if n.startswith("pgwarden_server_")}
    assert scrape("pgwarden_server_up") == 0
    stale = {n for n in scrape.names() if n.startswith("pgwarden_server_")}
    assert stale == {"pgwarden_server_up"}
    assert scrape("pgwarden_alerts_active", severity="critical") == 1
    assert scrape("pgwarden_monitor_check_errors_total") >= 1
    assert PASSWORD not in scrape.text


def test_active_alerts_by_severity(dsn: str, pool: Pool) -> None:
    settings = MonitorSettings(warn_pool_in_use=0)
    monitor = HealthMonitor(dsn, pools=[pool], settings=settings)
    try:
        before = Scrape(monitor)
        with pool.connection():
            monitor.check()
            during = Scrape(monitor)
        monitor.check()
        after = Scrape(monitor)
    finally:
        monitor.stop()

    for severity in ("warning", "critical"):
        assert before("pgwarden_alerts_active", severity=severity) == 0
        assert after("pgwarden_alerts_active", severity=severity) == 0
    assert during("pgwarden_alerts_active", severity="warning") == 1
    assert during("pgwarden_alerts_active", severity="critical") == 0
    assert not monitor.alerts.active  # the pool.app.in_use alert resolved


def test_alerts_metric_follows_the_alert_manager(dsn: str, pool: Pool) -> None:
    conninfo = make_conninfo(dsn, host="127.0.0.1", port=closed_port())
    down = HealthMonitor(
        conninfo, pools=[pool], settings=MonitorSettings(warn_pool_in_use=0)
    )
    try:
        with pool.connection():
            down.check()
            scrape = Scrape(down)
    finally:
        down.stop()
    active = Counter(a.severity.value for a in down.alerts.active.values())
    assert active == {"warning": 1, "critical": 1}
    for severity in ("warning", "critical"):
        assert scrape("pgwarden_alerts_active", severity=severity) == active[severity]


def test_pools_sharing_a_name_are_exported_once(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pools = [Pool(dsn, name="dup", min_size=0, max_size=n) for n in (2, 3)]
    monitor = HealthMonitor(dsn, pools=pools, settings=MonitorSettings())
    with caplog.at_level(logging.WARNING, "pgwarden.health"):
        Scrape(monitor)
        scrape = Scrape(monitor)

    assert scrape("pgwarden_pool_max_connections", pool="dup") == 2
    assert len([r for r in caplog.records if "'dup'" in r.getMessage()]) == 1


class ForeignPool:
    """A pool of another kind: a name, stats() and describe(), no wait buckets."""

    def __init__(self, pool: Pool) -> None:
        self.name = "foreign"
        self._pool = pool

    def stats(self) -> PoolStats:
        return dataclasses.replace(self._pool.stats(), name=self.name)

    def describe(self) -> tuple[ConnectionInfo, ...]:
        return self._pool.describe()


def test_any_pool_with_stats_and_describe_is_exported(dsn: str, pool: Pool) -> None:
    monitor = HealthMonitor(
        dsn, pools=[pool, ForeignPool(pool)], settings=MonitorSettings()
    )
    scrape = Scrape(monitor)

    assert scrape("pgwarden_pool_max_connections", pool="foreign") == 4
    assert scrape("pgwarden_lane_max_connections", pool="foreign", lane="web") == 3
    assert scrape.buckets("foreign") == scrape.buckets("app")


def test_alert_rules_file(pool: Pool, monitor: HealthMonitor) -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Pgwarden[A-Za-z]+", rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"] == {"severity": rule["labels"]["severity"]}
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert set(rule["annotations"]) == {"summary", "description"}

    # One rule at least for each built-in rule (rules.py).
    assert {r["alert"] for r in rules} >= {
        "PgwardenPoolGettingFull",  # pool.<name>.in_use
        "PgwardenPoolExhausted",  # pool.<name>.exhausted
        "PgwardenLaneExhausted",  # pool.<name>.lane.<lane>.exhausted
        "PgwardenPoolTimeouts",  # pool.<name>.timeouts
        "PgwardenConnectionLeak",  # pool.<name>.leaks
        "PgwardenPoolServerDown",  # pool.<name>.server_down
        "PgwardenServerDown",  # server.unreachable
        "PgwardenServerActiveConnections",  # server.active_connections
        "PgwardenServerConnectionUsage",  # server.usage
        "PgwardenIdleInTransaction",  # server.idle_in_transaction
        "PgwardenLongQueries",  # server.long_queries
        "PgwardenLockWaits",  # server.lock_waits
    }
    usage = [r for r in rules if r["alert"] == "PgwardenServerConnectionUsage"]
    assert {r["labels"]["severity"] for r in usage} == {"warning", "critical"}

    borrow(pool)
    monitor.check()
    exported = Scrape(monitor).names()
    referenced = {n for r in rules for n in re.findall(r"\bpgwarden_\w+", r["expr"])}
    assert referenced
    assert referenced <= exported, referenced - exported
