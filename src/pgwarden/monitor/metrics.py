"""Prometheus metrics of a `HealthMonitor`, read when scraped.

`build_registry` returns a registry of its own (never the global default, so
several monitors in one process don't collide) holding one collector. Each
scrape reads every attached pool's `stats()` (no I/O) and the monitor's latest
report and active alerts; nothing is cached between scrapes and nothing
queries the server. docs/metrics.md lists every metric.

Server gauges come from the latest check: when it could not read the server,
only ``pgwarden_server_up 0`` is exported (stale figures would mislead), and
before the first check no server metric is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from .alerts import Alert, Severity

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ..pool.stats import PoolStats
    from .monitor import HealthMonitor, MonitoredPool
    from .report import HealthReport
    from .snapshot import ServerSnapshot

__all__ = ["SERVER_STATES", "MonitorCollector", "build_registry"]

logger = logging.getLogger("pgwarden.health")

# A bucket bound as Prometheus writes it ("0.005", "+Inf"); untyped upstream.
_le: Callable[[float], str] = floatToGoString

# Always exported, at 0 when no session is in them, so series never vanish.
SERVER_STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
    "unknown",
)

# (metric suffix, help, PoolStats field) of the pool counters.
_POOL_COUNTERS = (
    ("timeouts", "Callers that gave up waiting for a connection.", "timeouts_total"),
    (
        "overloaded",
        "Callers refused at once because max_waiting callers already waited.",
        "overloaded_total",
    ),
    (
        "validation_failures",
        "Connections that failed validation (on borrow or while idle).",
        "validation_failures_total",
    ),
    (
        "evictions",
        "Connections closed for idle_timeout, max_lifetime or failed validation.",
        "evictions_total",
    ),
    (
        "leaks",
        "Connections detected held past leak_detection_threshold.",
        "leaks_total",
    ),
    (
        "reclaimed",
        "Connections taken back from a borrower who can't give them back: a"
        " handle garbage collected while on loan, or a borrow or give-back"
        " stopped halfway (KeyboardInterrupt).",
        "reclaimed_total",
    ),
    ("connections_opened", "Connections opened.", "connections_opened_total"),
    ("connections_closed", "Connections closed.", "connections_closed_total"),
    (
        "connection_errors",
        "Failed attempts to open a connection.",
        "connection_errors_total",
    ),
    (
        "connections_lost",
        "Connections found dead (server restart, killed session, network).",
        "connections_lost_total",
    ),
)


def build_registry(monitor: HealthMonitor) -> CollectorRegistry:
    """A new registry exporting `monitor`'s pools, server, alerts and checks."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(monitor))
    return registry


class MonitorCollector:
    """A `prometheus_client` collector reading a `HealthMonitor` at scrape time."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor
        self._warned_names: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        monitor = self.monitor
        yield from _pool_metrics(self._unique(monitor.pools))
        yield from _server_metrics(monitor.latest)
        yield _alert_metric(monitor.alerts.active.values())
        yield from _monitor_metrics(monitor)

    def _unique(self, pools: Iterable[MonitoredPool]) -> list[MonitoredPool]:
        """The pools, without later ones named like an earlier one.

        Two pools with one name would export the same series twice, which
        Prometheus rejects: the first one is kept, with a warning once per name.
        """
        seen: dict[str, MonitoredPool] = {}
        for pool in pools:
            if pool.name not in seen:
                seen[pool.name] = pool
            elif pool.name not in self._warned_names:
                self._warned_names.add(pool.name)
                logger.warning(
                    "two monitored pools are named %r: only the first is in the"
                    " metrics; give each pool its own name",
                    pool.name,
                )
        return list(seen.values())


# -- pools and lanes ----------------------------------------------------------


def _pool_metrics(pools: Sequence[MonitoredPool]) -> Iterator[Metric]:
    stats = [(p, p.stats()) for p in pools]

    connections = _gauge(
        "pgwarden_pool_connections",
        "Connections of the pool by state: idle, in_use, checking (being"
        " validated while idle), opening.",
        ["pool", "state"],
    )
    minimum = _gauge(
        "pgwarden_pool_min_connections",
        "The pool's min_size: connections kept open while idle.",
        ["pool"],
    )
    maximum = _gauge(
        "pgwarden_pool_max_connections",
        "The pool's max_size: most connections open at once.",
        ["pool"],
    )
    lend_limit = _gauge(
        "pgwarden_pool_lend_limit",
        "Connections that may be on loan at once while callers queue: the"
        " pool's max_size, or fewer while adaptive_concurrency holds lending"
        " back.",
        ["pool"],
    )
    waiting = _gauge(
        "pgwarden_pool_waiting_callers", "Callers waiting for a connection.", ["pool"]
    )
    held = _gauge(
        "pgwarden_pool_longest_held_seconds",
        "How long the longest-held connection on loan has been held.",
        ["pool"],
    )
    leaked = _gauge(
        "pgwarden_pool_leaked_connections",
        "Connections on loan now held past leak_detection_threshold.",
        ["pool"],
    )
    server_up = _gauge(
        "pgwarden_pool_server_up",
        "0 while the pool finds the server unreachable, else 1.",
        ["pool"],
    )
    for pool, s in stats:
        name = pool.name
        states = {
            "idle": s.idle,
            "in_use": s.in_use,
            "checking": s.checking,
            "opening": s.opening,
        }
        for state, count in states.items():
            connections.add_metric([name, state], count)
        minimum.add_metric([name], s.min_size)
        maximum.add_metric([name], s.max_size)
        lend_limit.add_metric([name], s.lend_limit)
        waiting.add_metric([name], s.waiting)
        held.add_metric([name], s.longest_held_seconds)
        leaks = sum(c.leak_suspected for c in pool.describe())
        leaked.add_metric([name], leaks)
        server_up.add_metric([name], 0 if s.server_down else 1)
    yield from (
        connections,
        minimum,
        maximum,
        lend_limit,
        waiting,
        held,
        leaked,
        server_up,
    )

    yield _wait_histogram([(pool.name, s) for pool, s in stats])
    for suffix, doc, field in _POOL_COUNTERS:
        counter = CounterMetricFamily(f"pgwarden_pool_{suffix}", doc, labels=["pool"])
        for pool, s in stats:
            counter.add_metric([pool.name], getattr(s, field))
        yield counter

    yield from _lane_metrics([(pool.name, s) for pool, s in stats])


def _lane_metrics(stats: Sequence[tuple[str, PoolStats]]) -> Iterator[Metric]:
    labels = ["pool", "lane"]
    in_use = _gauge(
        "pgwarden_lane_connections_in_use", "Connections the lane has on loan.", labels
    )
    waiting = _gauge(
        "pgwarden_lane_waiting_callers",
        "Callers of the lane waiting for a connection.",
        labels,
    )
    reserved = _gauge(
        "pgwarden_lane_reserved_connections",
        "Connections reserved for the lane.",
        labels,
    )
    limit = _gauge(
        "pgwarden_lane_max_connections",
        "Most connections the lane may have on loan (its limit).",
        labels,
    )
    for pool, s in stats:
        for lane_name, lane in s.lanes.items():
            in_use.add_metric([pool, lane_name], lane.in_use)
            waiting.add_metric([pool, lane_name], lane.waiting)
            reserved.add_metric([pool, lane_name], lane.reserved)
            limit.add_metric([pool, lane_name], lane.limit)
    yield from (in_use, waiting, reserved, limit)


def _wait_histogram(stats: Sequence[tuple[str, PoolStats]]) -> HistogramMetricFamily:
    histogram = HistogramMetricFamily(
        "pgwarden_pool_acquire_wait_seconds",
        "Time callers waited for a connection; a borrow served at once counts as 0.",
        labels=["pool"],
    )
    for pool, s in stats:
        buckets = [(_le(bound), float(count)) for bound, count in s.wait_histogram]
        buckets.append(("+Inf", float(s.borrowed_total)))
        histogram.add_metric([pool], buckets, s.wait_sum_seconds)
    return histogram


# -- the server -----------------------------------------------------------------


def _server_metrics(report: HealthReport | None) -> Iterator[Metric]:
    if report is None:
        return
    server = report.server
    yield GaugeMetricFamily(
        "pgwarden_server_up",
        "1 if the last check read the server, 0 if it could not.",
        value=0 if server is None else 1,
    )
    if server is not None:
        yield from _snapshot_metrics(server, report.long_query_threshold)


def _snapshot_metrics(server: ServerSnapshot, long_query: float) -> Iterator[Metric]:
    by_state = dict.fromkeys(SERVER_STATES, 0) | server.by_state
    connections = _gauge(
        "pgwarden_server_connections",
        "Client sessions of the monitored database by state (pg_stat_activity);"
        " 'unknown': sessions of other roles the monitor may not see.",
        ["state"],
    )
    for state, count in by_state.items():
        connections.add_metric([state], count)
    yield connections

    idle_in_xact = server.idle_in_transaction
    lock_waits = [w.waiting_seconds or 0.0 for w in server.lock_waits]
    running = [s.query_seconds or 0.0 for s in server.long_queries(0.0)]
    gauges: tuple[tuple[str, str, float], ...] = (
        (
            "max_connections",
            "The server's max_connections setting.",
            server.max_connections,
        ),
        (
            "usable_connections",
            "Connections non-superusers may open: max_connections less the"
            " reserved ones.",
            server.usable_connections,
        ),
        (
            "used_connections",
            "Client connections open on the whole server (the monitor's excepted).",
            server.total,
        ),
        (
            "connection_usage_ratio",
            "used_connections / usable_connections; above 1 only from reserved slots.",
            server.usage_ratio,
        ),
        (
            "oldest_transaction_seconds",
            "Age of the oldest open transaction in the database; 0 if none.",
            server.oldest_xact_seconds or 0.0,
        ),
        (
            "idle_in_transaction_sessions",
            "Sessions idle in a transaction (aborted ones included).",
            len(idle_in_xact),
        ),
        (
            "oldest_idle_in_transaction_seconds",
            "Longest time a session has been idle in a transaction; 0 if none.",
            max((s.state_seconds or 0.0 for s in idle_in_xact), default=0.0),
        ),
        (
            "longest_query_seconds",
            "Age of the longest-running query (sessions not idle); 0 if none.",
            max(running, default=0.0),
        ),
        (
            "long_queries",
            f"Queries running for more than the monitor's long_query_threshold"
            f" ({long_query:g} s).",
            len(server.long_queries(long_query)),
        ),
        ("lock_waits", "Sessions waiting on a lock.", len(lock_waits)),
        (
            "longest_lock_wait_seconds",
            "Longest time a session has been waiting on a lock; 0 if none.",
            max(lock_waits, default=0.0),
        ),
    )
    for suffix, doc, value in gauges:
        yield GaugeMetricFamily(f"pgwarden_server_{suffix}", doc, value=value)


# -- alerts and the monitor itself ----------------------------------------------


def _alert_metric(alerts: Iterable[Alert]) -> Metric:
    counts = dict.fromkeys(Severity, 0)
    for alert in alerts:
        counts[alert.severity] += 1
    metric = _gauge(
        "pgwarden_alerts_active",
        "Alerts the built-in rules have active, by severity.",
        ["severity"],
    )
    for severity, count in counts.items():
        metric.add_metric([severity.value], count)
    return metric


def _monitor_metrics(monitor: HealthMonitor) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "pgwarden_monitor_checks",
        "Checks completed.",
        value=monitor.checks_total,
    )
    yield CounterMetricFamily(
        "pgwarden_monitor_check_errors",
        "Failed attempts to read the server, and checks that failed.",
        value=monitor.check_errors_total,
    )
    yield GaugeMetricFamily(
        "pgwarden_monitor_check_interval_seconds",
        "Time between two checks (health_check_interval).",
        value=monitor.settings.health_check_interval,
    )
    latest = monitor.latest
    if latest is not None:
        yield GaugeMetricFamily(
            "pgwarden_monitor_check_duration_seconds",
            "How long the last check took.",
            value=latest.check_seconds,
        )
        yield GaugeMetricFamily(
            "pgwarden_monitor_last_check_timestamp_seconds",
            "When the last check ran (Unix time).",
            value=latest.taken_at.timestamp(),
        )


def _gauge(name: str, documentation: str, labels: Sequence[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)
