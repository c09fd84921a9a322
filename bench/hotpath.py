"""What one borrow and return costs, piece by piece, in a thread pool.

    python bench/hotpath.py [--n 100000] [--profile]

Times `with pool.connection(): pass` with the defaults (validation on borrow and
leak detection on), then each piece of that path on its own: the liveness test,
the lock, the core's decision, undoing client-side changes; the rest is
making and detaching the handle (the cost of "a returned handle is dead") and
the calls between. Then the same borrow with validation off and with leak
detection off, while another thread runs Python (which takes the GIL whenever
a borrow lets go of it), and the asyncio pool's borrow. Best of 5 runs (3 with
the other thread); no query is sent.
Run from the repository root. `--profile` instead runs the borrow under
pyinstrument (in the `bench` extra) and prints its call tree.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgwarden import AsyncPool, Pool
from pgwarden.embedded import EmbeddedPostgres


def best_of(func: Callable[[], object], n: int, runs: int = 5) -> float:
    """Microseconds per call, best of `runs`."""
    for _ in range(n // 10):
        func()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            func()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def borrow(pool: Pool) -> Callable[[], None]:
    def once() -> None:
        with pool.connection():
            pass

    return once


async def abest_of(pool: AsyncPool, n: int, runs: int = 5) -> float:
    """`best_of()` for an `AsyncPool`'s `async with pool.connection()`."""
    best = float("inf")
    for run in range(runs + 1):  # the first one warms up
        t0 = time.perf_counter()
        for _ in range(n):
            async with pool.connection():
                pass
        if run:
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def beside_python(pool: Pool, n: int) -> float:
    """`best_of()` a borrow while another thread runs Python."""
    stop = False

    def spin() -> None:
        while not stop:
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        return best_of(borrow(pool), n, runs=3)
    finally:
        stop = True
        spinner.join()


async def asyncio_borrow(dsn: str, n: int) -> float:
    async with AsyncPool(dsn, min_size=4, max_size=4) as pool:
        await pool.wait()
        return await abest_of(pool, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="pyinstrument's tree")
    args = parser.parse_args()
    n = args.n
    if args.profile:
        profile(n)
        return

    with EmbeddedPostgres() as pg:
        with Pool(pg.dsn(), min_size=4, max_size=4) as pool:
            pool.wait()
            took = best_of(borrow(pool), n)
            print(f"borrow + return, {'defaults':24s} {took:6.2f} µs")
            entry = pool._core.idle[-1]
            core, lane, lock = pool._core, pool._core.default_lane, pool._lock

            def locked() -> None:  # as the pool does: no `with`
                lock.acquire()
                lock.release()

            def decide() -> None:
                core.release(core.try_acquire(lane, 0.0), 0.0, True)  # type: ignore[arg-type]

            pieces = {
                "liveness test (no round trip)": lambda: pool._alive(entry),
                "lock, taken twice": locked,
                "core: acquire + release": decide,
                "undo client-side changes": entry.conn._pgw_restore,
            }
            for name, func in pieces.items():
                times = 2 if name.startswith("lock") else 1
                print(f"  {name:38s} {best_of(func, n) * times:6.2f} µs")
            took = beside_python(pool, n)
            print(f"borrow + return, {'another thread in Python':24s} {took:6.2f} µs")
        for label, overrides in (
            ("validation on borrow off", {"test_on_borrow": False}),
            ("leak detection off", {"leak_detection_threshold": 0}),
        ):
            with Pool(pg.dsn(), min_size=4, max_size=4, **overrides) as pool:
                pool.wait()
                took = best_of(borrow(pool), n)
                print(f"borrow + return, {label:24s} {took:6.2f} µs")
        took = asyncio.run(asyncio_borrow(pg.dsn(), n))
        print(f"borrow + return, {'asyncio, defaults':24s} {took:6.2f} µs")


def profile(n: int) -> None:
    """Print pyinstrument's call tree of `n` borrows (sampled every 10 µs)."""
    from pyinstrument import Profiler

    with EmbeddedPostgres() as pg, Pool(pg.dsn(), min_size=4, max_size=4) as pool:
        pool.wait()
        once = borrow(pool)
        profiler = Profiler(interval=1e-5)
        with profiler:
            for _ in range(n):
                once()
        print(profiler.output_text(unicode=True, color=False, show_all=True))


if __name__ == "__main__":
    main()
