"""The "nothing lost" invariants (N1-N8 of the reliability research), checked
against a pool after a fault has been injected and cleared.

Every fault test ends with `check_pool` (or `acheck_pool` for an `AsyncPool`) and,
when it closes the pool, `check_closed`/`acheck_closed`. N3 (bounded waits) is
`bounded`, around each acquire; N5 (no half-done work) and N8 (cancellation)
are checked by the scenarios themselves, which know what was written.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg.pq import TransactionStatus

from pgwarden import AsyncPool, Pool
from tests._util import await_until, wait_until
from tests.pool._helpers import backend_pids


def _accounting(pool: Pool | AsyncPool) -> None:
    """N1 (client side), N2 and N4, read under the pool's lock."""
    stats = pool.stats()
    assert stats.size == stats.idle + stats.in_use + stats.opening + stats.checking, (
        stats
    )
    assert stats.size <= stats.max_size, stats
    for name, lane in stats.lanes.items():
        assert 0 <= lane.in_use <= lane.limit, (name, lane)
    assert sum(lane.in_use for lane in stats.lanes.values()) == stats.in_use, stats
    pids = [c.pid for c in pool.describe()]
    assert len(pids) == len(set(pids)), f"a backend listed twice: {pids}"  # N2
    with pool._lock:
        for entry in pool._core.idle:  # N4: idle means IDLE, ready for anyone
            status = entry.conn.pgconn.transaction_status
            assert status == TransactionStatus.IDLE, (entry, status)


def _quiet(pool: Pool | AsyncPool) -> bool:
    s = pool.stats()
    return not (s.in_use or s.waiting or s.opening or s.checking)


def _server_agrees(pool: Pool | AsyncPool, admin: Any) -> bool:
    """N1 (server side): the server counts as many backends as the pool."""
    return len(backend_pids(admin, pool.config.application_name)) == pool.stats().size


def check_pool(
    pool: Pool, admin: Any, *, quiet_timeout: float = 10.0, recovered: bool = True
) -> None:
    """N1, N2, N4 and, with `recovered`, N6 for a thread pool."""
    _accounting(pool)
    wait_until(lambda: _quiet(pool), timeout=quiet_timeout, message="a quiet pool")
    if recovered:  # N6
        min_size = pool.config.min_size
        wait_until(
            lambda: pool.stats().idle >= min_size,
            timeout=quiet_timeout,
            message=f"recovery to min_size={min_size}",
        )
        with pool.connection(timeout=quiet_timeout) as conn:
            conn.execute("SELECT 1")
    wait_until(
        lambda: _quiet(pool) and _server_agrees(pool, admin),
        timeout=quiet_timeout,
        message="the server's count of backends to match the pool's size",
    )
    _accounting(pool)


async def acheck_pool(
    pool: AsyncPool, admin: Any, *, quiet_timeout: float = 10.0, recovered: bool = True
) -> None:
    """N1, N2, N4 and, with `recovered`, N6 for an asyncio pool."""
    _accounting(pool)
    await await_until(lambda: _quiet(pool), timeout=quiet_timeout, message="quiet")
    if recovered:  # N6
        min_size = pool.config.min_size
        await await_until(
            lambda: pool.stats().idle >= min_size,
            timeout=quiet_timeout,
            message=f"recovery to min_size={min_size}",
        )
        async with pool.connection(timeout=quiet_timeout) as conn:
            await conn.execute("SELECT 1")
    await await_until(
        lambda: _quiet(pool) and _server_agrees(pool, admin),
        timeout=quiet_timeout,
        message="the server's count of backends to match the pool's size",
    )
    _accounting(pool)


def _pool_threads(pool: Pool | AsyncPool) -> list[threading.Thread]:
    marker = f"pgwarden {pool.name} "
    return [t for t in threading.enumerate() if t.name.startswith(marker)]


def check_closed(pool: Pool, admin: Any, *, timeout: float = 10.0) -> None:
    """N7 for a thread pool: no backends, no background threads left."""
    assert pool._core.closed
    app = pool.config.application_name
    wait_until(
        lambda: not backend_pids(admin, app), timeout=timeout, message="no backends"
    )
    wait_until(lambda: not _pool_threads(pool), timeout=timeout, message="no threads")
    assert pool.stats().size == 0 and pool.stats().waiting == 0


async def acheck_closed(pool: AsyncPool, admin: Any, *, timeout: float = 10.0) -> None:
    """N7 for an asyncio pool: no backends, no background tasks left."""
    assert pool._core.closed
    app = pool.config.application_name

    def tasks() -> list[asyncio.Task[Any]]:
        marker = f"pgwarden {pool.name} "
        return [t for t in asyncio.all_tasks() if t.get_name().startswith(marker)]

    await await_until(lambda: not backend_pids(admin, app), timeout=timeout)
    await await_until(lambda: not tasks(), timeout=timeout, message="no tasks")
    assert pool.stats().size == 0 and pool.stats().waiting == 0


@contextmanager
def bounded(timeout: float, margin: float = 0.5) -> Iterator[None]:
    """N3: the block ends (returns or raises) within `timeout` + `margin` s."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - t0
        assert elapsed <= timeout + margin, f"took {elapsed:.2f} s, bound {timeout} s"
