"""The built-in health rules: what is wrong now, as `Condition`s.

Each rule reads a report (pool stats, the pools' connections, the server
snapshot) and says what is wrong now; `AlertManager` turns that into alerts
that fire once, repeat rarely and resolve once. Rules never query anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .alerts import Condition, Severity
from .settings import MonitorSettings

if TYPE_CHECKING:
    from .report import HealthReport, PoolReport
    from .snapshot import ServerSnapshot, Session

WARNING = Severity.WARNING
CRITICAL = Severity.CRITICAL

# How many sessions an alert message names before "and N more".
_NAMED = 5


def evaluate(
    report: HealthReport, settings: MonitorSettings, timeouts_before: dict[str, int]
) -> list[Condition]:
    """Every condition that holds in `report`.

    `timeouts_before` maps each pool's name to its `timeouts_total` at the
    previous check (missing: first check).
    """
    conditions: list[Condition] = []
    for pool in report.pools:
        conditions += _pool_rules(pool, settings, timeouts_before.get(pool.name))
    if report.server is None:
        conditions.append(
            Condition(
                key="server.unreachable",
                severity=CRITICAL,
                message=f"the database server can't be reached: {report.server_error}",
                details={"error": report.server_error},
            )
        )
    else:
        conditions += _server_rules(report.server, settings)
    return conditions


def _pool_rules(
    pool: PoolReport, settings: MonitorSettings, timeouts_before: int | None
) -> Iterator[Condition]:
    stats = pool.stats
    name = pool.name
    if stats.in_use > settings.warn_pool_in_use:
        yield Condition(
            key=f"pool.{name}.in_use",
            severity=WARNING,
            message=(
                f"pool {name!r} getting full: {stats.in_use} of {stats.max_size}"
                f" connections in use (warning above {settings.warn_pool_in_use})"
            ),
            details={"pool": name, "in_use": stats.in_use, "max_size": stats.max_size},
        )
    if stats.waiting and stats.in_use >= stats.max_size:
        yield Condition(
            key=f"pool.{name}.exhausted",
            severity=WARNING,
            message=(
                f"pool {name!r} exhausted: all {stats.max_size} connections in use,"
                f" {_n(stats.waiting, 'caller')} waiting"
            ),
            details={"pool": name, "in_use": stats.in_use, "waiting": stats.waiting},
        )
    for lane_name, lane in stats.lanes.items():
        if lane.waiting and lane.in_use >= lane.limit:
            yield Condition(
                key=f"pool.{name}.lane.{lane_name}.exhausted",
                severity=WARNING,
                message=(
                    f"lane {lane_name!r} of pool {name!r} at its limit of"
                    f" {lane.limit} with {_n(lane.waiting, 'caller')} waiting"
                ),
                details={
                    "pool": name,
                    "lane": lane_name,
                    "in_use": lane.in_use,
                    "limit": lane.limit,
                    "waiting": lane.waiting,
                },
            )
    if timeouts_before is not None and stats.timeouts_total > timeouts_before:
        new = stats.timeouts_total - timeouts_before
        yield Condition(
            key=f"pool.{name}.timeouts",
            severity=CRITICAL,
            message=f"pool {name!r}: {_n(new, 'caller')} timed out waiting for a"
            " connection since the last check",
            details={"pool": name, "timeouts": new},
        )
    leaks = [c for c in pool.connections if c.leak_suspected]
    if leaks:
        sites = "; ".join(
            f"pid {c.pid}, lane {c.lane}, held {c.held_seconds:.0f} s,"
            f" acquired at {c.acquired_at} by {c.holder}"
            for c in leaks[:_NAMED]
        )
        yield Condition(
            key=f"pool.{name}.leaks",
            severity=WARNING,
            message=f"pool {name!r}: {_n(len(leaks), 'connection')} held past the"
            f" leak threshold: {sites}{_more(leaks)}",
            details={"pool": name, "connections": [c.as_dict() for c in leaks]},
        )
    if stats.server_down:
        yield Condition(
            key=f"pool.{name}.server_down",
            severity=CRITICAL,
            message=f"pool {name!r} can't reach the server: {stats.last_error}",
            details={"pool": name, "error": stats.last_error},
        )


def _server_rules(
    server: ServerSnapshot, settings: MonitorSettings
) -> Iterator[Condition]:
    active = server.by_state.get("active", 0)
    if active > settings.warn_active_connections:
        yield Condition(
            key="server.active_connections",
            severity=WARNING,
            message=f"{_n(active, 'active connection')} on the database (warning above"
            f" {settings.warn_active_connections})",
            details={"active": active},
        )

    ratio = server.usage_ratio
    if ratio >= settings.warn_usage_ratio:
        severity = CRITICAL if ratio >= settings.critical_usage_ratio else WARNING
        yield Condition(
            key="server.usage",
            severity=severity,
            message=f"the server is at {ratio:.0%} of the connections non-superusers"
            f" may use ({server.total} of {server.usable_connections})",
            details={
                "usage_ratio": ratio,
                "total": server.total,
                "usable": server.usable_connections,
            },
        )

    idle = [
        s
        for s in server.idle_in_transaction
        if (s.state_seconds or 0.0) > settings.warn_idle_in_transaction
    ]
    if idle:
        yield Condition(
            key="server.idle_in_transaction",
            severity=WARNING,
            message=f"{_n(len(idle), 'session')} idle in transaction for more than"
            f" {settings.warn_idle_in_transaction:g} s: {_describe(idle)}",
            details={"sessions": [s.to_dict() for s in idle]},
        )

    long = list(server.long_queries(settings.long_query_threshold))
    if long:
        yield Condition(
            key="server.long_queries",
            severity=WARNING,
            message=f"{_n(len(long), 'query', 'queries')} running for more than"
            f" {settings.long_query_threshold:g} s: {_describe(long, clock='query')}",
            details={"sessions": [s.to_dict() for s in long]},
        )

    waits = [
        w
        for w in server.lock_waits
        if (w.waiting_seconds or 0.0) > settings.lock_wait_threshold
    ]
    if waits:
        roots = sorted({pid for w in waits for pid in w.root_blockers})
        by_pid = {s.pid: s for s in server.sessions}
        blockers = [by_pid[pid] for pid in roots if pid in by_pid]
        yield Condition(
            key="server.lock_waits",
            severity=WARNING,
            message=f"{_n(len(waits), 'session')} waiting on locks for more than"
            f" {settings.lock_wait_threshold:g} s, blocked by"
            f" {_describe(blockers) if blockers else 'pids ' + str(roots)}",
            details={
                "waits": [w.to_dict() for w in waits],
                "root_blockers": roots,
            },
        )


def _describe(sessions: Sequence[Session], clock: str = "state") -> str:
    parts = []
    for s in sessions[:_NAMED]:
        seconds = s.query_seconds if clock == "query" else s.state_seconds
        app = s.application_name or "no application"
        text = f"pid {s.pid} ({app}, {seconds or 0:.0f} s"
        a = s.attribution
        if a is not None:
            text += f"; pool {a.pool}, lane {a.lane}, held {a.held_seconds or 0:.0f} s"
            text += f", acquired at {a.acquired_at}"
        parts.append(text + ")")
    return ", ".join(parts) + _more(sessions)


def _n(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _more(items: Sequence[object]) -> str:
    return f" and {len(items) - _NAMED} more" if len(items) > _NAMED else ""
