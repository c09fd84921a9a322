"""Benchmark pgwarden's pools against psycopg_pool and direct connections.

Run from the project root::

    .venv/bin/python bench/run.py --quick           # about a minute
    .venv/bin/python bench/run.py --json            # full: 7 to 9 minutes
    .venv/bin/python bench/run.py --dsn 'host=db dbname=bench'

Starts a throwaway PostgreSQL (unless --dsn is given), runs every cell of
`workloads.CELLS` with every implementation of `impls`, probes the
terminated-backend guarantee (guarantee.py) and the memory overhead
(memory.py), and prints the medians and the issue's targets with PASS/FAIL
(targets.py); see bench/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import platform
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import guarantee
import memory
from harness import Quiet, Sample, Timing, measure_round
from impls import ASYNC_IMPLS, SYNC_IMPLS
from impls_base import AsyncImpl, SyncImpl
from metrics import STARVED_FRACTION
from report import render, summarize, write_json
from system import others_load, server_pid_of_backend, wait_until_quiet
from targets import evaluate, render_checks
from workloads import CELLS, Cell, drop_tables, setup_tables

Impl = type[SyncImpl] | type[AsyncImpl]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_CONNECTIONS = 200  # of the embedded server
ROUND_OVERHEAD = 0.8  # seconds: the quiet check, opening and closing

MODES = {
    "full": Timing(warmup=0.25, duration=1.5, slices=3),
    "quick": Timing(warmup=0.15, duration=0.5, slices=2),
}
REPS = {"full": 3, "quick": 1}
GUARANTEE_ROUNDS = {"full": 5, "quick": 2}  # per probed pool
MEMORY_REPEATS = {"full": 3, "quick": 1}  # per variant (a process each)
PROBES_SECONDS = {"full": 25.0, "quick": 10.0}  # both probes, about

NOTES = """\
vs direct: throughput / direct's (same kind: threads or asyncio) in the same
  round; median over the rounds. direct has no pool: each worker owns a
  connection (64 of them in the 64-worker cells): the upper bound, except
  with 64 threads on 2 cores, where the GIL makes it none (see README).
µs/op: wall time per operation, all workers together (1 / throughput). On
  'acquire', direct's µs/op is the harness's own cost: subtract it to get the
  net cost of one borrow and return.
wait: time to get a connection (entering the connection() block), per op.
CPU µs/op: CPU time of this process (harness, driver, pool; not the server)
  per operation. Client and server share {cpus} core(s): compare ratios within
  one run, not absolute numbers across runs (expect +-20% run to run).
Jain: Jain's fairness index over the workers' completed operations,
  (sum x)^2 / (n * sum x^2): 1.000 all equal, 1/n one worker did all; median
  over the rounds. starved: workers that completed under 10% of the mean, the
  most in any round.
asyncpg speaks its own protocol: SELECT 1 is one round trip (psycopg's is
  BEGIN, SELECT, COMMIT), plus one for its reset query on release unless
  -noreset; its ratio is to psycopg's direct-async.
other load: cores kept busy by other processes (neither this client nor its
  server) meanwhile; a slice above {limit:g} was measured again (--retries),
  and the row is suspect if it still is above."""


@dataclass(frozen=True)
class Round:
    """Every implementation of one kind on one cell, interleaved (see harness)."""

    cell: Cell
    kind: str
    rep: int
    impls: tuple[Impl, ...]  # in the order of the first slice


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    all_impls = [impl.name for impl in (*SYNC_IMPLS, *ASYNC_IMPLS)]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="about a minute in all")
    p.add_argument(
        "--json",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="write every sample and the summary as JSON"
        " (no PATH: bench/results/<mode>-<time>.json)",
    )
    p.add_argument("--dsn", help="use this server instead of an embedded one")
    p.add_argument(
        "--cell",
        action="append",
        choices=[cell.id for cell in CELLS],
        metavar="ID",
        help="run only this cell (repeatable): %(choices)s",
    )
    p.add_argument(
        "--impl",
        action="append",
        choices=all_impls,
        metavar="NAME",
        help="run only this implementation (repeatable; keep the direct ones"
        " for the ratios): %(choices)s",
    )
    p.add_argument("--reps", type=int, help="rounds per cell and kind")
    p.add_argument("--warmup", type=float, metavar="S", help="first warm-up")
    p.add_argument(
        "--duration", type=float, metavar="S", help="seconds measured per round"
    )
    p.add_argument("--slices", type=int, help="slices the duration is split in")
    p.add_argument("--seed", type=int, default=1, help="for run order and workers")
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.2,
        metavar="CORES",
        help="cores that other processes may keep busy during a slice"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--quiet-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="before each round, wait at most this long for the others'"
        " load to drop under --max-other-load (default: %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a slice again when the others' load was too high"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--no-probes",
        action="store_true",
        help="skip the guarantee and memory probes (targets 2's guarantee and 7)",
    )
    p.add_argument(
        "--format",
        choices=("auto", "plain", "rich"),
        default="auto",
        help="table style (auto: rich on a terminal, if installed)",
    )
    return p.parse_args(argv)


def _timing(args: argparse.Namespace, mode: str) -> Timing:
    base = MODES[mode]
    return Timing(
        warmup=base.warmup if args.warmup is None else args.warmup,
        duration=base.duration if args.duration is None else args.duration,
        slices=args.slices or base.slices,
        slice_warmup=base.slice_warmup,
    )


def _plan(
    cells: Sequence[Cell], impls: Sequence[Impl], reps: int, rng: random.Random
) -> Iterator[Round]:
    """The rounds: per cell and kind, `reps` of them, each in a new order.

    The order is shuffled once per cell and kind, then rotated by one place
    per round (and, within a round, per slice).
    """
    for cell in cells:
        for kind in ("sync", "async"):
            group = [
                impl
                for impl in impls
                if impl.kind == kind
                and impl.runs_in(cell.id)
                and cell.workload.supports(kind, impl.driver)
            ]
            if not group:
                continue
            rng.shuffle(group)
            for rep in range(reps):
                shift = rep % len(group)
                yield Round(cell, kind, rep, (*group[shift:], *group[:shift]))


def _round_seconds(timing: Timing, round_: Round) -> float:
    per_impl = (
        timing.warmup + timing.slice_warmup * (timing.slices - 1) + timing.duration
    )
    return len(round_.impls) * per_impl + ROUND_OVERHEAD


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[tuple[str, bool]]:
    """The DSN to benchmark against; and whether it is an embedded server."""
    if dsn is not None:
        yield dsn, False
        return
    from pgwarden.embedded import EmbeddedPostgres

    print("starting an embedded PostgreSQL ...", file=sys.stderr)
    with EmbeddedPostgres(settings={"max_connections": MAX_CONNECTIONS}) as pg:
        yield pg.dsn(), True


def _server_info(dsn: str) -> dict[str, Any]:
    """Some settings, and the postmaster's pid if the server runs here."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = ("server_version", "max_connections", "fsync", "synchronous_commit")
        info: dict[str, Any] = {}
        for name in names:
            row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
            info[name] = row[0] if row else None
        info["local_pid"] = server_pid_of_backend(conn.info.backend_pid)
        return info


def _check_capacity(server: dict[str, Any], rounds: Sequence[Round]) -> None:
    needed = max(
        (
            sum(
                i.connections(size=r.cell.pool_size, workers=r.cell.workers)
                for i in r.impls
            )
            for r in rounds
        ),
        default=0,
    )
    if int(server["max_connections"]) < needed + 3:
        print(
            f"warning: max_connections={server['max_connections']}, but a round"
            f" opens {needed} connections",
            file=sys.stderr,
        )


def _safe_dsn(dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def _versions() -> dict[str, str]:
    out = {}
    dists = ("pgwarden", "psycopg", "psycopg-binary", "psycopg-pool")
    for dist in (*dists, "sqlalchemy", "asyncpg", "prometheus-client"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    out["psycopg_impl"] = psycopg.pq.__impl__
    return out


def _note(text: str) -> None:
    print(f"          {text}", file=sys.stderr, flush=True)


def _progress(i: int, total: int, round_: Round, samples: Sequence[Sample]) -> None:
    print(
        f"[{i:>2}/{total}] {round_.cell.id} {round_.kind} round {round_.rep + 1}",
        file=sys.stderr,
    )
    for s in samples:
        if s.error:
            what = "FAILED: " + s.error.strip().splitlines()[-1]
        else:
            p99 = s.waits["p99"] * 1e6
            what = f"{s.throughput:>10,.0f} ops/s  wait p99 {p99:>9,.0f} µs"
            if s.cores and s.cores.other is not None:
                what += f"  other load {s.cores.other:.2f}"
        _note(f"{s.impl:<24} {what}")


def _measure(
    args: argparse.Namespace,
    rounds: Sequence[Round],
    dsn: str,
    timing: Timing,
    server_pid: int | None,
) -> list[Sample]:
    quiet = Quiet(server_pid, args.max_other_load, args.retries)

    def waiting(load: float) -> None:
        _note(f"waiting for other processes to calm down ({load:.2f} cores busy)")

    def retrying(name: str, load: float) -> None:
        _note(f"{name}: others kept {load:.2f} cores busy; slice measured again")

    samples: list[Sample] = []
    for i, round_ in enumerate(rounds, 1):
        wait_until_quiet(server_pid, args.max_other_load, args.quiet_timeout, waiting)
        got = measure_round(
            round_.impls,
            round_.cell,
            dsn,
            timing,
            rep=round_.rep,
            seed=args.seed * 1000 + round_.rep,
            quiet=quiet,
            on_retry=retrying,
        )
        _progress(i, len(rounds), round_, got)
        samples.extend(got)
    return samples


@dataclass
class Probes:
    """The results of the probes outside the timed rounds (None: skipped)."""

    guarantee: list[guarantee.Probed] | None = None
    memory: memory.Memory | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "guarantee": None
            if self.guarantee is None
            else [dataclasses.asdict(p) for p in self.guarantee],
            "memory": None if self.memory is None else self.memory.as_dict(),
        }


def _probe(dsn: str, impls: Sequence[Impl], mode: str) -> Probes:
    print("probes: terminated backends, then memory ...", file=sys.stderr)
    found = guarantee.probe(impls, dsn, GUARANTEE_ROUNDS[mode])
    for p in found:
        what = "FAILED" if p.error else f"dead handed out {p.dead} of {p.borrows}"
        _note(f"{p.impl:<24} {what}")
    mem = memory.measure(dsn, MEMORY_REPEATS[mode])
    for kind in ("sync", "async"):
        over = mem.overhead(kind)
        if over is not None:
            _note(f"memory {kind:<17} +{over['total_mb']:.1f} MB")
    if mem.error:
        _note(f"memory FAILED: {mem.error}")
    return Probes(found, mem)


def _meta(
    args: argparse.Namespace,
    mode: str,
    reps: int,
    timing: Timing,
    started: tuple[float, datetime, tuple[float, float, float]],
    server: dict[str, Any],
) -> dict[str, Any]:
    clock, started_at, load_before = started
    return {
        "mode": mode,
        "started_at": started_at.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - clock, 1),
        "reps": reps,
        "timing": {
            "warmup_s": timing.warmup,
            "duration_s": timing.duration,
            "slices": timing.slices,
            "slice_warmup_s": timing.slice_warmup,
        },
        "seed": args.seed,
        "max_other_load": args.max_other_load,
        "retries": args.retries,
        "order": "per cell and kind: shuffled, then rotated by one place"
        " per round and per slice",
        "starved_below": f"{STARVED_FRACTION:.0%} of the mean per-worker count",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "versions": _versions(),
        "server": server,
    }


def _json_path(arg: str, mode: str, started_at: datetime) -> Path:
    if arg != "auto":
        return Path(arg)
    return RESULTS_DIR / f"{mode}-{started_at.strftime('%Y%m%d-%H%M%S')}.json"


def _warn(samples: Sequence[Sample], limit: float) -> None:
    disturbed = [s for s in samples if s.cores and others_load(s.cores) > limit]
    if disturbed:
        print(
            f"\nwarning: in {len(disturbed)} of {len(samples)} samples, other"
            f" processes kept more than {limit:g} cores busy on average",
        )
    for s in samples:
        if s.error:
            print(
                f"\n=== FAILED: {s.cell} {s.impl} round {s.rep + 1} ===\n{s.error}",
                file=sys.stderr,
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    mode = "quick" if args.quick else "full"
    timing = _timing(args, mode)
    reps = args.reps or REPS[mode]
    cells = [c for c in CELLS if not args.cell or c.id in args.cell]
    impls: list[Impl] = [*SYNC_IMPLS, *ASYNC_IMPLS]
    impls = [impl for impl in impls if not args.impl or impl.name in args.impl]
    cpus = os.cpu_count() or 1
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )

    rounds = list(_plan(cells, impls, reps, random.Random(args.seed)))
    seconds = sum(_round_seconds(timing, r) for r in rounds)
    seconds += 0 if args.no_probes else PROBES_SECONDS[mode]
    print(
        f"{mode} mode: {len(rounds)} rounds; per implementation and round"
        f" {timing.duration:g} s measured in {timing.slices} slices;"
        f" about {seconds / 60:.1f} min on a quiet machine",
        file=sys.stderr,
    )

    started = (time.monotonic(), datetime.now(UTC), os.getloadavg())
    probes = Probes()
    with _server(args.dsn) as (dsn, embedded):
        server = _server_info(dsn)
        _check_capacity(server, rounds)
        setup_tables(dsn)
        try:
            samples = _measure(args, rounds, dsn, timing, server["local_pid"])
        finally:
            drop_tables(dsn)
        if not args.no_probes:
            probes = _probe(dsn, impls, mode)

    rows = summarize(samples, cells, [impl.name for impl in impls])
    checks = evaluate(samples, probes.guarantee, probes.memory)
    fancy = args.format == "rich" or (args.format == "auto" and sys.stdout.isatty())
    print(
        f"\npgwarden bench, {mode} mode: {reps} round(s) per cell and kind,"
        f" {timing.duration:g} s measured per implementation and round in"
        f" {timing.slices} interleaved slices; medians over the rounds"
        f" ({cpus} CPUs; PostgreSQL {server['server_version']}"
        f"{', embedded' if embedded else ''})"
    )
    render(rows, cells, sys.stdout, fancy=fancy)
    print("\n" + NOTES.format(cpus=cpus, limit=args.max_other_load))
    _warn(samples, args.max_other_load)
    if probes.guarantee is not None and probes.memory is not None:
        print("\n" + "\n".join(guarantee.describe(probes.guarantee)))
        print("\n" + "\n".join(probes.memory.describe()))
    render_checks(checks, sys.stdout, fancy=fancy)
    if mode == "quick":
        print("(quick mode: one short round per cell; the verdicts are indicative)")

    if args.json:
        path = _json_path(args.json, mode, started[1])
        server |= {"embedded": embedded, "dsn": _safe_dsn(dsn)}
        meta = _meta(args, mode, reps, timing, started, server)
        extra = {"targets": [dataclasses.asdict(c) for c in checks]}
        write_json(path, meta, cells, samples, rows, extra | probes.as_json())
        print(f"\nJSON: {path}")
    failed = any(s.error for s in samples) or _probe_failed(probes)
    return 1 if failed else 0


def _probe_failed(probes: Probes) -> bool:
    bad = any(p.error for p in probes.guarantee or ())
    return bad or bool(probes.memory and probes.memory.error)


if __name__ == "__main__":
    sys.exit(main())
