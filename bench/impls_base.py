"""What every implementation under test provides: `SyncImpl` and `AsyncImpl`.

A sync implementation is used by threads, an async one by the tasks of one
event loop (create it inside that loop). Creating one does no I/O; `open`
connects everything before the clock starts; ``connection(i)`` lends worker
``i`` a connection for a ``with`` block (as ``with pool.connection() as
conn:``); `close` closes it all, even after a failed `open`.

`driver` names the workload functions an implementation runs (see
workloads.py); `cells`, if set, limits it to those cells (a variant only
some target needs costs no time elsewhere).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, ClassVar

__all__ = ["OPEN_TIMEOUT", "AsyncImpl", "SyncImpl"]

# Longest wait for an implementation to open all its connections.
OPEN_TIMEOUT = 60.0


class _Base:
    name: ClassVar[str]
    driver: ClassVar[str] = "psycopg"  # which workload functions it runs
    # The ratio reference of its kind: one connection per worker, no pool.
    reference: ClassVar[bool] = False
    # The cells it runs in (by id); None: all of them.
    cells: ClassVar[frozenset[str] | None] = None

    def __init__(self, dsn: str, *, size: int, workers: int) -> None:
        self.dsn = dsn
        self.size = size
        self.workers = workers

    @classmethod
    def connections(cls, *, size: int, workers: int) -> int:
        """How many connections it opens for a pool size and a worker count."""
        return workers if cls.reference else size

    @classmethod
    def runs_in(cls, cell_id: str) -> bool:
        """Whether it is measured in the cell `cell_id`."""
        return cls.cells is None or cell_id in cls.cells


class SyncImpl(_Base, ABC):
    """Lends connections to threads."""

    kind: ClassVar[str] = "sync"

    @abstractmethod
    def open(self) -> None:
        """Open every connection; return once they are all ready."""

    @abstractmethod
    def connection(self, worker: int) -> AbstractContextManager[Any]:
        """Lend a connection to `worker` for the duration of a `with` block."""

    @abstractmethod
    def close(self) -> None:
        """Close what `open` opened, even if it failed half way."""


class AsyncImpl(_Base, ABC):
    """Lends connections to asyncio tasks."""

    kind: ClassVar[str] = "async"

    @abstractmethod
    async def open(self) -> None:
        """Open every connection; return once they are all ready."""

    @abstractmethod
    def connection(self, worker: int) -> AbstractAsyncContextManager[Any]:
        """Lend a connection to `worker` for an `async with` block."""

    @abstractmethod
    async def close(self) -> None:
        """Close what `open` opened, even if it failed half way."""
