"""What waking another thread costs: two threads pass a lock back and forth.

    python bench/handoff.py [--n 20000]

A pool with more threads than connections wakes one waiting thread per
operation (the one the returned connection goes to). This measures that
hand-off alone, without any pool: wall and CPU time per hand-off, best of
3 runs. On a 2-vCPU VM it is about 30 µs wall and 25 µs CPU.

Then what starting a thread takes (`Thread.start()` returns once the thread
runs) while 16 other threads run Python, with a `time.sleep(0)` every 1,000
loops as if they did some I/O: why the pool starts its threads (to open or
close connections) only after letting go of its lock.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def handoffs(n: int) -> tuple[float, float]:
    """Wall and CPU seconds per hand-off over `n` round trips (2 hand-offs each)."""
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def serve() -> None:
        for _ in range(n):
            ping.acquire()
            pong.release()

    server = threading.Thread(target=serve)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    server.start()
    for _ in range(n):
        ping.release()
        pong.acquire()
    server.join()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall / (2 * n), cpu / (2 * n)


def thread_starts(n: int, busy: int = 16) -> list[float]:
    """Seconds each of `n` `Thread.start()` calls took beside `busy` threads."""
    stop = False

    def spin() -> None:
        loops = 0
        while not stop:
            loops += 1
            if loops % 1000 == 0:
                time.sleep(0)

    spinners = [threading.Thread(target=spin) for _ in range(busy)]
    for t in spinners:
        t.start()
    took = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            thread = threading.Thread(target=lambda: None)
            thread.start()
            took.append(time.perf_counter() - t0)
            thread.join()
    finally:
        stop = True
        for t in spinners:
            t.join()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    n = parser.parse_args().n
    wall, cpu = min(handoffs(n) for _ in range(3))
    print(
        f"one thread waking another: {wall * 1e6:.1f} µs wall, {cpu * 1e6:.1f} µs CPU"
    )
    took = sorted(thread_starts(50))
    print(
        f"starting a thread beside 16 busy ones: median"
        f" {statistics.median(took) * 1e3:.1f} ms, max {took[-1] * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
