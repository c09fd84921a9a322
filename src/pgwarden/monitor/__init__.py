"""Watching the pools and the server: snapshots, rules, alerts, metrics.

`HealthMonitor` checks the attached pools and the server every
`health_check_interval`; `take_snapshot` is the one query that reads the server
(also used by the ops commands); alerts fire once, repeat rarely and resolve.
"""

from .alerts import (
    Alert,
    AlertEvent,
    AlertManager,
    Condition,
    EventKind,
    LogSink,
    Severity,
)
from .monitor import HealthMonitor
from .report import HealthReport, PoolReport
from .settings import MonitorSettings
from .snapshot import (
    Attribution,
    LockNode,
    LockWait,
    ServerSnapshot,
    Session,
    atake_snapshot,
    preview,
    take_snapshot,
)

__all__ = [
    "Alert",
    "AlertEvent",
    "AlertManager",
    "Attribution",
    "Condition",
    "EventKind",
    "HealthMonitor",
    "HealthReport",
    "LockNode",
    "LockWait",
    "LogSink",
    "MonitorSettings",
    "PoolReport",
    "ServerSnapshot",
    "Session",
    "Severity",
    "WebhookSink",
    "atake_snapshot",
    "preview",
    "take_snapshot",
]


def __getattr__(name: str) -> object:
    # WebhookSink brings in the standard library's HTTP client: load it on use.
    if name == "WebhookSink":
        from .webhook import WebhookSink

        return WebhookSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
