"""What the scenario tests share, for both kinds of pool."""

from __future__ import annotations

from typing import Any

import psycopg

from pgwarden import PoolError
from tests.pool._helpers import unique_app


def fault_settings(**overrides: Any) -> dict[str, Any]:
    """Pool settings scaled for fault tests: small pools, fractions of a second.

    Each pool gets its own application_name: the invariant checker counts the
    server's backends by it.
    """
    settings: dict[str, Any] = {
        "min_size": 2,
        "max_size": 4,
        "connection_timeout": 1.0,
        "query_timeout": 1.0,
        "validation_timeout": 0.3,
        "application_name": unique_app(),
    }
    settings.update(overrides)
    return settings


def is_query_error(ex: BaseException) -> bool:
    """An error from the server or the network on a query: an
    `OperationalError` that is not the pool's own (`PoolTimeout` and the like)."""
    return isinstance(ex, psycopg.OperationalError) and not isinstance(ex, PoolError)
