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
    "LaneSpec",
    "LaneStats",
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
