"""The connection pool: `AsyncPool` (asyncio) and `Pool` (threads)."""

from .connection import PooledConnection
from .connection_async import AsyncPooledConnection
from .pool import Pool
from .pool_async import AsyncPool
from .stats import ConnectionInfo, LaneStats, PoolStats

__all__ = [
    "AsyncPool",
    "AsyncPooledConnection",
    "ConnectionInfo",
    "LaneStats",
    "Pool",
    "PoolStats",
    "PooledConnection",
]
