"""Probe: is a connection whose backend was terminated ever handed out?

Target 2 asks for speed *and* the pool issue's guarantee: a connection whose
session has ended (and whose end has reached the client) is never handed
out. For each pool, each round:

1. borrow all `SIZE` connections at once, run ``SELECT 1`` on each (so they
   were used a moment ago: no pool's idle-time check applies), give back;
2. end their backends with ``pg_terminate_backend(pid, 5000)``, which waits
   until each is gone, then let `SETTLE` seconds pass for the end to reach
   the client;
3. borrow all `SIZE` again and run ``SELECT 1`` on each: one that fails was a
   dead connection handed out.

Pools without a check (psycopg_pool, plain SQLAlchemy) are probed too, to
show that the probe bites. Not probed: direct connections, other drivers,
and psycopg_pool with its check, which holds the guarantee but then spends
about 7 s per round (after a failed check its getconn retries with a back-off
of 1, 2, 4 s). The loggers are silenced meanwhile: the dead connections are
the point. `recovery_ms` is how long the borrows of step 3 took, all `SIZE`
of them (reconnecting included): the median over the rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from impls_base import AsyncImpl, SyncImpl

__all__ = ["SIZE", "Probed", "describe", "probe"]

SIZE = 4  # connections per pool, all borrowed at once
SKIP = frozenset({"psycopg_pool+check", "psycopg_pool+check-async"})  # slow
SETTLE = 0.02  # seconds between the backends' end and the next borrow
_QUIET = ("pgwarden", "psycopg.pool", "sqlalchemy")

Impl = type[SyncImpl] | type[AsyncImpl]


@dataclass(frozen=True)
class Probed:
    """One pool's result: `dead` of `borrows` borrowed connections were dead."""

    impl: str
    kind: str
    rounds: int
    borrows: int
    dead: int
    recovery_ms: float | None = None
    error: str | None = None


def probed(impls: Sequence[Impl]) -> list[Impl]:
    """The implementations the probe applies to: psycopg pools, all cells."""
    return [
        i
        for i in impls
        if not i.reference
        and i.driver == "psycopg"
        and i.cells is None
        and i.name not in SKIP
    ]


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _terminate(admin: psycopg.Connection[Any], pids: Sequence[int]) -> None:
    admin.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM unnest(%s::int[]) AS pid",
        (list(pids),),
    )


class _Count:
    """What the rounds of one pool saw."""

    def __init__(self, impl: Impl, rounds: int) -> None:
        self.impl, self.rounds = impl, rounds
        self.borrows = self.dead = 0
        self.recoveries: list[float] = []

    def result(self, error: str | None = None) -> Probed:
        recovery = statistics.median(self.recoveries) if self.recoveries else None
        return Probed(
            self.impl.name,
            self.impl.kind,
            self.rounds,
            self.borrows,
            self.dead,
            None if recovery is None else recovery * 1e3,
            error,
        )


def _sync(impl_cls: type[SyncImpl], dsn: str, rounds: int) -> Probed:
    impl = impl_cls(dsn, size=SIZE, workers=SIZE)
    count = _Count(impl_cls, rounds)
    with psycopg.connect(dsn, autocommit=True) as admin:
        try:
            impl.open()
            for _ in range(rounds):
                with contextlib.ExitStack() as stack:
                    conns = [
                        stack.enter_context(impl.connection(i)) for i in range(SIZE)
                    ]
                    for conn in conns:
                        conn.execute("SELECT 1").fetchone()
                    pids = [conn.info.backend_pid for conn in conns]
                _terminate(admin, pids)
                time.sleep(SETTLE)
                with contextlib.ExitStack() as stack:
                    t0 = time.perf_counter()
                    conns = [
                        stack.enter_context(impl.connection(i)) for i in range(SIZE)
                    ]
                    count.recoveries.append(time.perf_counter() - t0)
                    for conn in conns:
                        count.borrows += 1
                        try:
                            conn.execute("SELECT 1").fetchone()
                        except psycopg.Error:
                            count.dead += 1
        except Exception:
            return count.result(traceback.format_exc())
        finally:
            impl.close()
    return count.result()


async def _async(impl_cls: type[AsyncImpl], dsn: str, rounds: int) -> Probed:
    impl = impl_cls(dsn, size=SIZE, workers=SIZE)
    count = _Count(impl_cls, rounds)
    with psycopg.connect(dsn, autocommit=True) as admin:
        try:
            await impl.open()
            for _ in range(rounds):
                async with contextlib.AsyncExitStack() as stack:
                    conns = [
                        await stack.enter_async_context(impl.connection(i))
                        for i in range(SIZE)
                    ]
                    for conn in conns:
                        await (await conn.execute("SELECT 1")).fetchone()
                    pids = [conn.info.backend_pid for conn in conns]
                _terminate(admin, pids)  # blocks the loop: nothing else runs
                await asyncio.sleep(SETTLE)
                async with contextlib.AsyncExitStack() as stack:
                    t0 = time.perf_counter()
                    conns = [
                        await stack.enter_async_context(impl.connection(i))
                        for i in range(SIZE)
                    ]
                    count.recoveries.append(time.perf_counter() - t0)
                    for conn in conns:
                        count.borrows += 1
                        try:
                            await (await conn.execute("SELECT 1")).fetchone()
                        except psycopg.Error:
                            count.dead += 1
        except Exception:
            return count.result(traceback.format_exc())
        finally:
            await impl.close()
    return count.result()


def probe(impls: Sequence[Impl], dsn: str, rounds: int) -> list[Probed]:
    """Probe each applicable implementation of `impls` for `rounds` rounds."""
    out = []
    with _quiet_loggers():
        for impl_cls in probed(impls):
            if issubclass(impl_cls, SyncImpl):
                out.append(_sync(impl_cls, dsn, rounds))
            elif issubclass(impl_cls, AsyncImpl):
                out.append(asyncio.run(_async(impl_cls, dsn, rounds)))
    return out


def describe(results: Sequence[Probed]) -> list[str]:
    """A few lines for the report."""
    if not results:
        return []
    r = results[0]
    lines = [
        f"terminated-backend probe: {r.rounds} round(s) of {SIZE} borrows per pool,"
        f" backends ended {SETTLE * 1e3:g} ms before"
        " (recovery: the 4 borrows after the kill)"
    ]
    for p in results:
        if p.error:
            what = "FAILED: " + p.error.strip().splitlines()[-1]
        else:
            ms = "-" if p.recovery_ms is None else f"{p.recovery_ms:,.1f} ms"
            what = f"dead handed out {p.dead:>2} of {p.borrows:<3} recovery {ms}"
        lines.append(f"  {p.impl:<24} {what}")
    return lines
