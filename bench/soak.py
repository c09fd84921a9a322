"""Soak: borrow, write and commit for minutes while the network and server fail.

    python bench/soak.py [--duration 300] [--threads 12] [--tasks 12] [--seed N]

Threads (a `Pool`) and asyncio tasks (an `AsyncPool`, in a loop of its own)
run short transactions through an in-process TCP proxy that flaps between
pass, close (FIN or RST), blackhole and latency, while the server is restarted
at random. Every few seconds the pools' accounting is checked while they work;
at the end, with the faults cleared, every invariant (N1-N7 of the reliability
research) is checked. Prints the counts and exits 1 on any violation.

Not part of the test run: it needs minutes. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.invariants import _accounting
from tests.faults.proxy import Proxy

from pgwarden import AsyncPool, Pool, PoolConfig
from pgwarden.embedded import EmbeddedPostgres

SETTINGS: dict[str, Any] = {
    "min_size": 3,
    "max_size": 8,
    "lanes": "web:2:6,jobs:1:4",
    "connection_timeout": 1.0,
    "query_timeout": 1.0,
    "validation_timeout": 0.3,
    "idle_timeout": 5.0,
    "eviction_interval": 1.0,
    "max_lifetime": 20.0,
    "leak_detection_threshold": 0,
}
DEADLINE_MARGIN = 0.5  # N3: an acquire ends by its timeout plus this


@dataclass
class Tally:
    """What the workers saw, merged from every thread and task."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    operations: int = 0
    committed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    worst_wait_ratio: float = 0.0  # wait / (timeout + margin); must stay <= 1
    late: int = 0  # N3 violations
    violations: list[str] = field(default_factory=list)

    def record(
        self, ok: bool, error: str | None, waited: float, timeout: float
    ) -> None:
        with self.lock:
            self.operations += 1
            self.committed += ok
            if error:
                self.errors[error] += 1
            ratio = waited / (timeout + DEADLINE_MARGIN)
            self.worst_wait_ratio = max(self.worst_wait_ratio, ratio)
            if ratio > 1.0:
                self.late += 1
                self.violations.append(
                    f"N3: acquire took {waited:.2f} s (timeout {timeout})"
                )

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)


def _token() -> str:
    return uuid.uuid4().hex


def thread_worker(pool: Pool, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        timeout = rng.choice([0.2, 1.0, 2.0])
        t0 = time.monotonic()
        waited = 0.0
        try:
            with pool.connection(
                lane=rng.choice(["web", "jobs", None]), timeout=timeout
            ) as conn:
                waited = time.monotonic() - t0
                token = _token()
                # Two rows per transaction: N5 says never one without the other.
                conn.execute(
                    "INSERT INTO soak (token) VALUES (%s), (%s)", [token, token]
                )
                if rng.random() < 0.1:
                    raise _Abandon
            tally.record(True, None, waited, timeout)
        except _Abandon:
            tally.record(False, None, waited, timeout)
        except psycopg.Error as ex:
            waited = waited or time.monotonic() - t0
            tally.record(False, type(ex).__name__, waited, timeout)


class _Abandon(Exception):
    """A block that fails on purpose: its rows must be rolled back."""


async def task_worker(
    pool: AsyncPool, tally: Tally, stop: threading.Event, seed: int
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        timeout = rng.choice([0.2, 1.0, 2.0])
        t0 = time.monotonic()
        waited = 0.0
        try:
            async with pool.connection(
                lane=rng.choice(["web", "jobs", None]), timeout=timeout
            ) as conn:
                waited = time.monotonic() - t0
                token = _token()
                await conn.execute(
                    "INSERT INTO soak (token) VALUES (%s), (%s)", [token, token]
                )
                if rng.random() < 0.1:
                    raise _Abandon
            tally.record(True, None, waited, timeout)
        except _Abandon:
            tally.record(False, None, waited, timeout)
        except psycopg.Error as ex:
            waited = waited or time.monotonic() - t0
            tally.record(False, type(ex).__name__, waited, timeout)


def chaos(
    proxy: Proxy,
    pg: EmbeddedPostgres,
    stop: threading.Event,
    seed: int,
    log: Counter[str],
) -> None:
    """Flap the network and restart the server until `stop`."""
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(0.5, 2.5)):
        fault = rng.choices(
            ["close", "rst", "blackhole", "latency", "restart", "immediate"],
            weights=[3, 2, 3, 2, 1, 1],
        )[0]
        log[fault] += 1
        if fault == "close":
            proxy.close_all()
        elif fault == "rst":
            proxy.close_all(rst=True)
        elif fault == "blackhole":
            proxy.blackhole()
        elif fault == "latency":
            proxy.latency(rng.choice([0.01, 0.05]))
        else:
            pg.restart("fast" if fault == "restart" else "immediate")
        stop.wait(rng.uniform(0.2, 1.5))
        proxy.pass_()


def live_check(pools: list[Pool | AsyncPool], tally: Tally) -> None:
    """N1, N2, N4 on the client side while the pools work."""
    for pool in pools:
        try:
            _accounting(pool)
        except AssertionError as ex:
            tally.violation(f"{pool.name}: {ex}")


def final_check(
    pools: list[Pool | AsyncPool], admin: psycopg.Connection[Any], tally: Tally
) -> None:
    """With the faults cleared: N1 (server agrees), N5, N6."""
    for pool in pools:
        app = pool.config.application_name
        deadline = time.monotonic() + 15
        while True:
            stats = pool.stats()
            server = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [app],
            ).fetchone()[0]  # type: ignore[index]
            quiet = not (
                stats.in_use or stats.waiting or stats.opening or stats.checking
            )
            if quiet and stats.idle >= stats.min_size and server == stats.size:
                break
            if time.monotonic() > deadline:
                tally.violation(
                    f"N1/N6 {pool.name}: pool size {stats.size} (idle {stats.idle},"
                    f" min {stats.min_size}), server counts {server}"
                )
                break
            time.sleep(0.1)
    halves = admin.execute(
        "SELECT count(*) FROM (SELECT token FROM soak GROUP BY token"
        " HAVING count(*) <> 2) AS t"
    ).fetchone()[0]  # type: ignore[index]
    if halves:
        tally.violation(f"N5: {halves} transactions committed in part")


def closed_check(
    pools: list[Pool | AsyncPool], admin: psycopg.Connection[Any], tally: Tally
) -> None:
    """N7: after close(), no backend and no background thread is left."""
    deadline = time.monotonic() + 10
    for pool in pools:
        app = pool.config.application_name
        while True:
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [app],
            ).fetchone()[0]  # type: ignore[index]
            marker = f"pgwarden {pool.name} "
            threads = [
                t.name for t in threading.enumerate() if t.name.startswith(marker)
            ]
            if not left and not threads:
                break
            if time.monotonic() > deadline:
                tally.violation(f"N7 {pool.name}: {left} backends, threads {threads}")
                break
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=12)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--check-every", type=float, default=3.0)
    args = parser.parse_args()

    tally, faults = Tally(), Counter[str]()
    stop = threading.Event()
    with EmbeddedPostgres() as pg, Proxy("127.0.0.1", pg.port) as proxy:
        admin = psycopg.connect(pg.dsn(), autocommit=True)
        admin.execute("CREATE TABLE soak (id bigserial, token text)")
        dsn = proxy.dsn(pg.dsn())
        sync_pool = Pool(
            PoolConfig.coerce(dsn, application_name="soak-threads", **SETTINGS),
            name="threads",
        )
        sync_pool.open()
        holder: dict[str, AsyncPool] = {}
        loop_ready, checked = threading.Event(), threading.Event()

        def run_loop() -> None:
            async def body() -> None:
                pool = AsyncPool(
                    dsn, name="tasks", application_name="soak-tasks", **SETTINGS
                )
                holder["pool"] = pool
                await pool.open()
                loop_ready.set()
                workers = [
                    asyncio.create_task(
                        task_worker(pool, tally, stop, args.seed + 1000 + i)
                    )
                    for i in range(args.tasks)
                ]
                await asyncio.gather(*workers)
                while not checked.is_set():  # the pool keeps running for the check
                    await asyncio.sleep(0.05)
                await pool.close(timeout=5)

            asyncio.run(body())

        loop_thread = threading.Thread(target=run_loop, name="soak loop")
        loop_thread.start()
        loop_ready.wait(10)
        threads = [
            threading.Thread(
                target=thread_worker, args=(sync_pool, tally, stop, args.seed + i)
            )
            for i in range(args.threads)
        ]
        chaos_thread = threading.Thread(
            target=chaos, args=(proxy, pg, stop, args.seed, faults), name="chaos"
        )
        for t in [*threads, chaos_thread]:
            t.start()
        pools: list[Pool | AsyncPool] = [sync_pool, holder["pool"]]
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.duration:
            time.sleep(args.check_every)
            live_check(pools, tally)
            print(
                f"{time.monotonic() - t0:6.0f} s  ops {tally.operations:,}"
                f"  committed {tally.committed:,}"
                f"  errors {sum(tally.errors.values()):,}"
                f"  violations {len(tally.violations)}",
                flush=True,
            )
        stop.set()
        for t in [*threads, chaos_thread]:
            t.join(30)
        proxy.pass_()
        admin.close()
        admin = psycopg.connect(pg.dsn(), autocommit=True)
        final_check(pools, admin, tally)
        checked.set()
        loop_thread.join(30)
        sync_pool.close()
        closed_check(pools, admin, tally)
        rows = admin.execute("SELECT count(*) FROM soak").fetchone()[0]  # type: ignore[index]
        admin.close()

    print()
    print(
        f"duration {args.duration:.0f} s, seed {args.seed},"
        f" {args.threads} threads + {args.tasks} tasks"
    )
    print(f"faults injected: {dict(faults)}")
    print(
        f"operations {tally.operations:,}, committed {tally.committed:,}"
        f" ({rows:,} rows)"
    )
    print(f"errors by kind: {dict(tally.errors.most_common())}")
    print(
        f"worst acquire wait: {tally.worst_wait_ratio:.0%}"
        f" of its deadline (+{DEADLINE_MARGIN} s)"
    )
    print(f"invariant violations: {len(tally.violations)}")
    for text in tally.violations[:20]:
        print(f"  {text}")
    return 1 if tally.violations else 0


if __name__ == "__main__":
    sys.exit(main())
