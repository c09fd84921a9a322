"""Where short transactions from threads lose throughput: queueing or the pool.

    python bench/queueing.py [--seconds 3] [--rounds 2]

Sixteen threads run `run.py`'s short transaction (BEGIN, UPDATE one row,
COMMIT, on its table), as its `txn-16x8` cell does, four ways: a connection per thread
(`direct`), pgwarden's `Pool` with 8 connections and with 16, and a plain
`queue.LifoQueue` of 8 connections (the least a pool can do). For each:
throughput, and per transaction the process's user and system CPU time and
its voluntary context switches. With 16 connections no thread ever waits for
one; with 8, half of them queue. Run from the repository root.
"""

from __future__ import annotations

import argparse
import queue
import random
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from pgwarden import Pool
from pgwarden.embedded import EmbeddedPostgres
from workloads import TRANSACTION, SyncOp, setup_tables

THREADS = 16
WARMUP = 0.5
Borrow = Callable[[int], AbstractContextManager[Any]]
transaction: SyncOp = TRANSACTION.sync_ops["psycopg"]


def measure(name: str, borrow: Borrow, seconds: float) -> None:
    stop = threading.Event()
    counts = [0] * THREADS

    def worker(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            with borrow(i) as conn:
                transaction(conn, rng)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    time.sleep(WARMUP)
    r0, n0, t0 = resource.getrusage(resource.RUSAGE_SELF), sum(counts), time.monotonic()
    time.sleep(seconds)
    r1, n1, t1 = resource.getrusage(resource.RUSAGE_SELF), sum(counts), time.monotonic()
    stop.set()
    for t in threads:
        t.join()
    n = n1 - n0
    print(
        f"  {name:22} {n / (t1 - t0):7,.0f} txn/s"
        f"  user {(r1.ru_utime - r0.ru_utime) / n * 1e6:4.0f} µs"
        f"  system {(r1.ru_stime - r0.ru_stime) / n * 1e6:4.0f} µs"
        f"  context switches {(r1.ru_nvcsw - r0.ru_nvcsw) / n:4.1f}",
        flush=True,
    )


@contextmanager
def direct(dsn: str) -> Iterator[Borrow]:
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(THREADS)]
    try:
        yield lambda i: nullcontext(conns[i])
    finally:
        for conn in conns:
            conn.close()


@contextmanager
def pgwarden(dsn: str, size: int) -> Iterator[Borrow]:
    # The plain fair hand-off: adaptive concurrency (on by default) off.
    with Pool(dsn, min_size=size, max_size=size, adaptive_concurrency=False) as pool:
        pool.wait(10)
        yield lambda i: pool.connection()


@contextmanager
def plain_queue(dsn: str, size: int) -> Iterator[Borrow]:
    idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
    for _ in range(size):
        idle.put(psycopg.connect(dsn, autocommit=True))

    @contextmanager
    def borrow(i: int) -> Iterator[psycopg.Connection[Any]]:
        conn = idle.get()
        try:
            yield conn
        finally:
            idle.put(conn)

    try:
        yield borrow
    finally:
        while not idle.empty():
            idle.get().close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with EmbeddedPostgres() as pg:
        dsn = pg.dsn()
        setup_tables(dsn)
        ways: list[tuple[str, Callable[[], AbstractContextManager[Borrow]]]] = [
            ("direct (16 connections)", lambda: direct(dsn)),
            ("pgwarden, 8", lambda: pgwarden(dsn, 8)),
            ("pgwarden, 16", lambda: pgwarden(dsn, 16)),
            ("LifoQueue, 8", lambda: plain_queue(dsn, 8)),
        ]
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}, {THREADS} threads:", flush=True)
            for name, way in ways:
                with way() as borrow:
                    measure(name, borrow, args.seconds)


if __name__ == "__main__":
    main()
