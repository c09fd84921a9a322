"""Where short transactions from threads lose throughput: queueing or the pool.

    python bench/queueing.py [--seconds 3] [--rounds 4] [--pin]

Sixteen threads run `run.py`'s short transaction (BEGIN, UPDATE one row,
COMMIT, on its table), as its `txn-16x8` cell does, six ways:

- `direct`: a connection per thread;
- pgwarden's `Pool` with 8 connections and with 16 (with 16 no thread ever
  waits; with 8, half of them queue);
- a bare fair pool of 8: a FIFO queue handing each returned connection
  straight to the thread that waited longest, with no checks (the least a
  fair pool can do);
- 8 at a time over 16 connections: the same FIFO hand-off, of a turn rather
  than a connection, each thread on a connection of its own (so the limit on
  transactions at once is told apart from the number of connections);
- a plain `queue.LifoQueue` of 8 connections (unfair: a thread giving a
  connection back may take it again at once).

For each: throughput, and per transaction the process's user and system CPU
time and its voluntary context switches; then, over the rounds (each starts
with another way), the median throughput and its ratio to `direct`'s. With
`--pin`, the server runs on one CPU and this process on another, so that
they stop competing for the same ones (Linux). Run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import resource
import statistics
import sys
import threading
import time
from collections import deque
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


def measure(name: str, borrow: Borrow, seconds: float) -> float:
    """Print and return the throughput of 16 threads borrowing with `borrow`."""
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
    rate = n / (t1 - t0)
    print(
        f"  {name:26} {rate:7,.0f} txn/s"
        f"  user {(r1.ru_utime - r0.ru_utime) / n * 1e6:4.0f} µs"
        f"  system {(r1.ru_stime - r0.ru_stime) / n * 1e6:4.0f} µs"
        f"  context switches {(r1.ru_nvcsw - r0.ru_nvcsw) / n:4.1f}",
        flush=True,
    )
    return rate


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


def borrowing(idle: queue.LifoQueue[Any] | FairQueue) -> Borrow:
    """Borrow from a queue: get() a connection, put() it back."""

    @contextmanager
    def borrow(i: int) -> Iterator[psycopg.Connection[Any]]:
        conn = idle.get()
        try:
            yield conn
        finally:
            idle.put(conn)

    return borrow


@contextmanager
def plain_queue(dsn: str, size: int) -> Iterator[Borrow]:
    idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
    for _ in range(size):
        idle.put(psycopg.connect(dsn, autocommit=True))
    try:
        yield borrowing(idle)
    finally:
        while not idle.empty():
            idle.get().close()


class FairQueue:
    """A bare FIFO hand-off: what is given back goes straight to the thread
    that waited longest, woken alone (as pgwarden's pool does)."""

    def __init__(self, items: list[Any]) -> None:
        self._idle = items
        self._waiters: deque[list[Any]] = deque()  # [lock, item]
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._idle and not self._waiters:
                return self._idle.pop()
            waiter: list[Any] = [threading.Lock(), None]
            waiter[0].acquire()
            self._waiters.append(waiter)
        waiter[0].acquire()
        return waiter[1]

    def put(self, item: Any) -> None:
        with self._lock:
            if not self._waiters:
                self._idle.append(item)
                return
            waiter = self._waiters.popleft()
            waiter[1] = item
        waiter[0].release()


@contextmanager
def fair_queue(dsn: str, size: int) -> Iterator[Borrow]:
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(size)]
    try:
        yield borrowing(FairQueue(list(conns)))
    finally:
        for conn in conns:
            conn.close()


@contextmanager
def turns(dsn: str, size: int) -> Iterator[Borrow]:
    """A connection per thread, `size` of them in a transaction at a time."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(THREADS)]
    turn = FairQueue([None] * size)

    @contextmanager
    def borrow(i: int) -> Iterator[psycopg.Connection[Any]]:
        turn.get()
        try:
            yield conns[i]
        finally:
            turn.put(None)

    try:
        yield borrow
    finally:
        for conn in conns:
            conn.close()


def pin(pg: EmbeddedPostgres) -> None:
    """Move the server's processes to the first CPU this process may use, and
    this process (the threads it starts next) to the second."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs two CPUs")
    pid_file = pg.data_dir / "postmaster.pid"
    postmaster = int(pid_file.read_text().split()[0])
    server = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == postmaster:  # its parent
            server.append(int(stat.parent.name))
    for pid in server:  # backends started later inherit the postmaster's
        os.sched_setaffinity(pid, {cpus[0]})
    os.sched_setaffinity(0, {cpus[1]})
    print(f"server on CPU {cpus[0]}, client on CPU {cpus[1]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--pin", action="store_true", help="server on one CPU, client on another"
    )
    args = parser.parse_args()
    with EmbeddedPostgres() as pg:
        if args.pin:
            pin(pg)
        dsn = pg.dsn()
        setup_tables(dsn)
        ways: list[tuple[str, Callable[[], AbstractContextManager[Borrow]]]] = [
            ("direct (16 connections)", lambda: direct(dsn)),
            ("pgwarden, 8", lambda: pgwarden(dsn, 8)),
            ("pgwarden, 16", lambda: pgwarden(dsn, 16)),
            ("bare fair pool, 8", lambda: fair_queue(dsn, 8)),
            ("8 at a time over 16", lambda: turns(dsn, 8)),
            ("LifoQueue, 8", lambda: plain_queue(dsn, 8)),
        ]
        rates: dict[str, list[float]] = {name: [] for name, _ in ways}
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}, {THREADS} threads:", flush=True)
            first = round_ % len(ways)
            for name, way in ways[first:] + ways[:first]:
                with way() as borrow:
                    rates[name].append(measure(name, borrow, args.seconds))
        direct_rate = statistics.median(rates[ways[0][0]])
        print(f"median over {args.rounds} rounds:")
        for name, _ in ways:
            rate = statistics.median(rates[name])
            print(f"  {name:26} {rate:7,.0f} txn/s  {rate / direct_rate:4.2f}x direct")


if __name__ == "__main__":
    main()
