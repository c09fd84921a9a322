"""pgwarden: keeps PostgreSQL connections healthy when workloads share a database."""

from .config import LaneSpec, PoolConfig
from .errors import (
    ConfigError,
    ConnectionReturned,
    PgwardenError,
    PoolClosed,
    PoolError,
    PoolOverloaded,
    PoolTimeout,
    QueryTimeout,
    UnknownLane,
)
from .monitor import HealthMonitor, HealthReport, MonitorSettings
from .pool import (
    AsyncPool,
    AsyncPooledConnection,
    LaneStats,
    Pool,
    PooledConnection,
    PoolStats,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncPool",
    "AsyncPooledConnection",
    "ConfigError",
    "ConnectionReturned",
    "HealthMonitor",
    "HealthReport",
    "LaneSpec",
    "LaneStats",
    "MonitorSettings",
    "PgwardenError",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "PoolOverloaded",
    "PoolStats",
    "PoolTimeout",
    "PooledConnection",
    "QueryTimeout",
    "UnknownLane",
]
