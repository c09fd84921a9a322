"""What `adaptive_concurrency` does over a long run, in a thread pool.

    python bench/adaptive.py [--seconds 15] [--rounds 2] [--only WORD]

Workloads where callers queue: `SELECT 1` from 64 threads over 16
connections (the GIL is the bottleneck), short transactions from 16 threads
over 8 (BEGIN, UPDATE, COMMIT), `pg_sleep(0.002)` from 64 threads over 16
(the server is), `SELECT 1` with a 50 ms query in one borrow of 500 (a
report among short queries), Python work while a connection is held and
between borrows, and three lanes sharing 40 connections (the shape of the
SMS platform pgwarden started from: three workloads over one pool of 40).
Each runs with the option off and on, alternating which goes first, for
`--seconds` after 3 s of warm-up; it prints throughput, the 99th percentile
of the time a borrow waited for its connection, and the limit the pool lent
at, sampled every 0.1 s.
`bench/run.py`'s rounds (1.5 s) are too short for the option's confirmations
(several seconds): this is the long run. Run from the repository root.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from pgwarden import Pool
from pgwarden.embedded import EmbeddedPostgres

Op = Callable[[Any, random.Random], None]
WARMUP = 3.0


def select1(conn: Any, rng: random.Random) -> None:
    conn.execute("SELECT 1")


def transaction(conn: Any, rng: random.Random) -> None:
    with conn.transaction():
        conn.execute(
            "UPDATE adaptive_bench SET n = n + 1 WHERE id = %s", (rng.randint(1, 1000),)
        )


def server_wait(conn: Any, rng: random.Random) -> None:
    conn.execute("SELECT pg_sleep(0.002)")


def mostly_short(conn: Any, rng: random.Random) -> None:
    """`SELECT 1`, and in one borrow of 500 a 50 ms query (a report)."""
    conn.execute("SELECT pg_sleep(0.05)" if rng.random() < 0.002 else "SELECT 1")


def python_work(seconds: float) -> None:
    """Keep the GIL busy, as a request's own Python code does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def work_in_borrow(conn: Any, rng: random.Random) -> None:
    """Two queries with 0.2 ms of Python between them, connection held."""
    conn.execute("SELECT 1")
    python_work(0.0002)
    conn.execute("SELECT 1")


def work_between(rng: random.Random) -> None:
    python_work(0.0003)


def select1_or_transaction(conn: Any, rng: random.Random) -> None:
    (transaction if rng.random() < 0.5 else select1)(conn, rng)


class Workload(NamedTuple):
    title: str
    op: Op
    workers: int
    size: int
    between: Callable[[random.Random], None] | None = None  # between borrows
    lanes: dict[str, tuple[int, int]] | None = None  # worker i: lane i % len


WORKLOADS: list[Workload] = [
    Workload("SELECT 1, 64 threads over 16", select1, 64, 16),
    Workload("short transaction, 16 threads over 8", transaction, 16, 8),
    Workload("pg_sleep(2 ms), 64 threads over 16", server_wait, 64, 16),
    Workload(
        "SELECT 1, 1 in 500 a 50 ms query, 64 threads over 16", mostly_short, 64, 16
    ),
    Workload(
        "two SELECT 1 with 0.2 ms of Python between, 64 threads over 16",
        work_in_borrow,
        64,
        16,
    ),
    Workload(
        "SELECT 1 and 0.3 ms of Python after each borrow, 64 threads over 16",
        select1,
        64,
        16,
        between=work_between,
    ),
    Workload(
        "lanes: SELECT 1 or a transaction, 96 threads over 40 in 3 lanes",
        select1_or_transaction,
        96,
        40,
        lanes={"api": (4, 40), "web": (4, 40), "calls": (4, 40)},
    ),
]


def measure(
    dsn: str, load: Workload, adaptive: bool, seconds: float
) -> tuple[float, float, Counter[int]]:
    """Borrows per second after the warm-up, their wait's p99 (seconds), and
    the lend limits sampled."""
    op, workers, size, between = load.op, load.workers, load.size, load.between
    names = list(load.lanes or [None])
    with Pool(
        dsn,
        min_size=size,
        max_size=size,
        adaptive_concurrency=adaptive,
        lanes=load.lanes or (),
    ) as pool:
        pool.wait(10)
        stop = threading.Event()
        measuring = threading.Event()
        counts = [0] * workers
        waits: list[list[float]] = [[] for _ in range(workers)]

        def worker(i: int) -> None:
            rng = random.Random(i)
            mine = waits[i]
            lane = names[i % len(names)]
            while not stop.is_set():
                t0 = time.perf_counter()
                with pool.connection(lane) as conn:
                    if measuring.is_set():
                        mine.append(time.perf_counter() - t0)
                    op(conn, rng)
                counts[i] += 1
                if between is not None:
                    between(rng)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        time.sleep(WARMUP)
        limits: Counter[int] = Counter()
        measuring.set()
        start, t0 = sum(counts), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            time.sleep(0.1)
            limits[pool.stats().lend_limit] += 1
        rate = (sum(counts) - start) / (time.perf_counter() - t0)
        measuring.clear()
        stop.set()
        for t in threads:
            t.join()
    every = sorted(w for mine in waits for w in mine)
    p99 = every[int(len(every) * 0.99)] if every else math.nan
    return rate, p99, limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--only",
        action="append",
        metavar="WORD",
        help="run only the workloads whose title has this word (repeatable)",
    )
    args = parser.parse_args()
    with EmbeddedPostgres() as pg:
        dsn = pg.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE adaptive_bench (id int PRIMARY KEY, n int)")
            conn.execute(
                "INSERT INTO adaptive_bench SELECT g, 0 FROM generate_series(1, 1000) g"
            )
        for load in WORKLOADS:
            if args.only and not any(word in load.title for word in args.only):
                continue
            print(load.title, flush=True)
            for round_ in range(args.rounds):
                run = (dsn, load)
                # Alternating which goes first, so that drift hits both alike.
                if round_ % 2 == 0:
                    off, off_p99, _ = measure(*run, False, args.seconds)
                on, on_p99, limits = measure(*run, True, args.seconds)
                if round_ % 2 == 1:
                    off, off_p99, _ = measure(*run, False, args.seconds)
                shares = ", ".join(
                    f"{limit}: {n / sum(limits.values()):.0%}"
                    for limit, n in sorted(limits.items())
                )
                print(
                    f"  round {round_ + 1}: off {off:7,.0f}/s (p99 wait"
                    f" {off_p99 * 1e3:5.1f} ms)  on {on:7,.0f}/s (p99 wait"
                    f" {on_p99 * 1e3:5.1f} ms)  ({on / off:.2f}x)  lend limit {shares}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
