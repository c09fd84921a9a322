"""Target 7: what a pool of 40 connections with the monitor adds to a process.

Each variant runs in a fresh interpreter (this file, run as a script with
``--child``) against the same server and prints its resident set size
(VmRSS from /proc/self/status) at a few points:

- ``psycopg``: imports psycopg, then opens `CONNECTIONS` plain connections
  and runs ``SELECT 1`` on each: the connections themselves.
- ``pgwarden``: imports psycopg, then pgwarden; opens a ``pgwarden.Pool``
  with ``min_size = max_size =`` `CONNECTIONS`, borrows them all at once and
  runs ``SELECT 1`` on each; attaches a ``HealthMonitor(pools=[pool])``, runs
  one check, builds its metrics registry and renders it once (a scrape).
- ``psycopg-async`` and ``pgwarden-async``: the same with
  ``psycopg.AsyncConnection`` and ``pgwarden.AsyncPool`` in an event loop.

pgwarden's overhead is the pgwarden variant's final RSS minus the plain
variant's: importing pgwarden, the pool's own structures and threads or
tasks, and the monitor (including its own connection to the server, and
prometheus_client, imported when the registry is built). The variants
alternate, `repeats` times each, after one uncounted run that leaves fresh
bytecode caches; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CONNECTIONS", "Memory", "measure"]

CONNECTIONS = 40
VARIANTS = ("psycopg", "pgwarden", "psycopg-async", "pgwarden-async")
_MB = 1024 * 1024
_TIMEOUT = 120.0  # seconds, per child


def _rss() -> int:
    """Resident set size in bytes (the peak, where /proc is missing)."""
    gc.collect()
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * 1024 if sys.platform != "darwin" else peak


# -- in the child -------------------------------------------------------------


def _scrape(registry: Any) -> None:
    """Render the metrics once, as a /metrics request would."""
    from prometheus_client import generate_latest

    generate_latest(registry)


def _plain(dsn: str) -> dict[str, int]:
    import psycopg

    out = {"import": _rss()}
    conns = [psycopg.connect(dsn) for _ in range(CONNECTIONS)]
    for conn in conns:
        conn.execute("SELECT 1").fetchone()
        conn.commit()
    out["connections"] = _rss()
    out["final"] = out["connections"]
    for conn in conns:
        conn.close()
    return out


def _pgwarden(dsn: str) -> dict[str, int]:
    import contextlib

    import psycopg  # noqa: F401  (first, as in the plain variant)

    out = {"import": _rss()}
    import pgwarden

    out["import_pgwarden"] = _rss()
    with pgwarden.Pool(dsn, min_size=CONNECTIONS, max_size=CONNECTIONS) as pool:
        pool.wait()
        with contextlib.ExitStack() as stack:
            for _ in range(CONNECTIONS):
                stack.enter_context(pool.connection()).execute("SELECT 1").fetchone()
        out["connections"] = _rss()
        monitor = pgwarden.HealthMonitor(dsn, pools=[pool])
        monitor.check()
        out["checked"] = _rss()
        _scrape(monitor.registry)
        out["final"] = _rss()
        monitor.stop()
    return out


async def _aplain(dsn: str) -> dict[str, int]:
    import psycopg

    out = {"import": _rss()}
    conns = [await psycopg.AsyncConnection.connect(dsn) for _ in range(CONNECTIONS)]
    for conn in conns:
        await (await conn.execute("SELECT 1")).fetchone()
        await conn.commit()
    out["connections"] = _rss()
    out["final"] = out["connections"]
    for conn in conns:
        await conn.close()
    return out


async def _apgwarden(dsn: str) -> dict[str, int]:
    import contextlib

    import psycopg  # noqa: F401  (first, as in the plain variant)

    out = {"import": _rss()}
    import pgwarden

    out["import_pgwarden"] = _rss()
    pool = pgwarden.AsyncPool(dsn, min_size=CONNECTIONS, max_size=CONNECTIONS)
    async with pool:
        await pool.wait()
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(CONNECTIONS):
                conn = await stack.enter_async_context(pool.connection())
                await (await conn.execute("SELECT 1")).fetchone()
        out["connections"] = _rss()
        monitor = pgwarden.HealthMonitor(dsn, pools=[pool])
        await asyncio.to_thread(monitor.check)  # as in the monitor's thread
        out["checked"] = _rss()
        _scrape(monitor.registry)
        out["final"] = _rss()
        monitor.stop()
    return out


def _child(variant: str, dsn: str) -> dict[str, int]:
    start = _rss()
    if variant == "psycopg":
        out = _plain(dsn)
    elif variant == "pgwarden":
        out = _pgwarden(dsn)
    elif variant == "psycopg-async":
        out = asyncio.run(_aplain(dsn))
    else:
        out = asyncio.run(_apgwarden(dsn))
    return out | {"start": start}


# -- in the runner ------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Median RSS readings (bytes) per variant, and what they add up to."""

    connections: int
    repeats: int
    readings: dict[str, dict[str, float]]  # variant -> point -> median bytes
    error: str | None = None

    def overhead(self, kind: str) -> dict[str, float] | None:
        """pgwarden's overhead in MB for "sync" or "async", split up."""
        suffix = "" if kind == "sync" else "-async"
        plain = self.readings.get("psycopg" + suffix)
        ours = self.readings.get("pgwarden" + suffix)
        if not plain or not ours:
            return None
        per_conn = (plain["connections"] - plain["import"]) / self.connections
        return {
            "total_mb": (ours["final"] - plain["final"]) / _MB,
            "import_mb": (ours["import_pgwarden"] - ours["import"]) / _MB,
            "pool_mb": (
                ours["connections"]
                - ours["import_pgwarden"]
                - (plain["connections"] - plain["import"])
            )
            / _MB,
            "monitor_mb": (ours["final"] - ours["connections"]) / _MB,
            "monitor_check_mb": (ours["checked"] - ours["connections"]) / _MB,
            "metrics_mb": (ours["final"] - ours["checked"]) / _MB,
            "per_connection_mb": per_conn / _MB,
            "plain_process_mb": plain["final"] / _MB,
        }

    def describe(self) -> list[str]:
        """A few lines for the report."""
        head = (
            f"memory probe: VmRSS, median of {self.repeats} process(es) per variant,"
            f" {self.connections} connections"
        )
        if self.error:
            return [head, f"  FAILED: {self.error}"]
        lines = [head]
        for variant, r in self.readings.items():
            points = ", ".join(
                f"{point} {r[point] / _MB:.1f}"
                for point in ("import", "import_pgwarden", "connections", "final")
                if point in r
            )
            lines.append(f"  {variant:<15} MB after: {points}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "repeats": self.repeats,
            "readings_bytes": self.readings,
            "overhead": {k: self.overhead(k) for k in ("sync", "async")},
            "error": self.error,
        }


def _run_child(variant: str, dsn: str) -> dict[str, int]:
    # Bytecode caches are written (as an installed package has them): with
    # PYTHONDONTWRITEBYTECODE set, every child would compile pgwarden from
    # source, and the compiler's peak would count as pgwarden's (2 MB more).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", variant],
        input=dsn,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
        cwd=Path(__file__).resolve().parent,  # no .env from the project root
        env=env,
    )
    if done.returncode:
        raise RuntimeError(f"{variant}: exit {done.returncode}\n{done.stderr}")
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(dsn: str, repeats: int, variants: Sequence[str] = VARIANTS) -> Memory:
    """Run every variant `repeats` times, alternating; medians of each reading."""
    runs: dict[str, list[dict[str, int]]] = {v: [] for v in variants}
    try:
        # Not counted: leaves fresh bytecode caches (src/ may have changed).
        _run_child("pgwarden", dsn)
        for _ in range(repeats):
            for variant in variants:
                runs[variant].append(_run_child(variant, dsn))
    except Exception as ex:
        return Memory(CONNECTIONS, repeats, {}, f"{type(ex).__name__}: {ex}")
    readings = {
        v: {point: statistics.median(r[point] for r in rs) for point in rs[0]}
        for v, rs in runs.items()
        if rs
    }
    return Memory(CONNECTIONS, repeats, readings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=VARIANTS, required=True)
    args = parser.parse_args()
    dsn = sys.stdin.read().strip()  # not on the command line: it may hold a password
    print(json.dumps(_child(args.child, dsn)))


if __name__ == "__main__":
    main()
