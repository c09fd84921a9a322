"""`HealthReport`: what one check of the health monitor saw."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..pool.stats import ConnectionInfo, PoolStats
from .alerts import Alert, Severity
from .snapshot import ServerSnapshot


@dataclass(frozen=True, slots=True)
class PoolReport:
    """One attached pool at the time of the check."""

    name: str
    stats: PoolStats
    connections: tuple[ConnectionInfo, ...]

    @property
    def exhausted(self) -> bool:
        """All connections in use and callers waiting."""
        return bool(self.stats.waiting) and self.stats.in_use >= self.stats.max_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stats": self.stats.as_dict(),
            "connections": [c.as_dict() for c in self.connections],
        }


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The result of one check: pools, server, active alerts.

    `server` is None when the server could not be read; `server_error` then
    says why.
    """

    taken_at: datetime
    check_seconds: float
    long_query_threshold: float
    pools: tuple[PoolReport, ...]
    server: ServerSnapshot | None
    server_error: str | None
    alerts: tuple[Alert, ...]

    @property
    def healthy(self) -> bool:
        """The server answers and no alert is critical."""
        return self.server is not None and all(
            a.severity < Severity.CRITICAL for a in self.alerts
        )

    def readiness(self) -> tuple[bool, str]:
        """Whether to take traffic: the database answers and no pool is exhausted."""
        if self.server is None:
            return False, f"database unreachable: {self.server_error}"
        exhausted = [p.name for p in self.pools if p.exhausted]
        if exhausted:
            return False, f"pool exhausted: {', '.join(exhausted)}"
        return True, "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the body of `/status` (see the README for the fields)."""
        ready, reason = self.readiness()
        return {
            "taken_at": self.taken_at.isoformat(),
            "check_seconds": self.check_seconds,
            "healthy": self.healthy,
            "ready": ready,
            "ready_reason": reason,
            "server": (
                self.server.to_dict(self.long_query_threshold) if self.server else None
            ),
            "server_error": self.server_error,
            "pools": [p.to_dict() for p in self.pools],
            "alerts": [a.to_dict() for a in self.alerts],
        }
