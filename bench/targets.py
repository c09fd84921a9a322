"""The performance issue's targets 1-7, checked for pgwarden from one run.

Every comparison between two implementations is made round by round (both
measured in the same interleaved round) and the median over the rounds is
compared with the threshold. Threads and asyncio are checked separately,
each against its own counterparts. A check that lacks data (a subset run, a
failure) is reported as not measured.
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from guarantee import Probed
from harness import Sample
from impls import (
    Direct,
    DirectAsync,
    Pgwarden,
    PgwardenAsync,
    PgwardenNoAdaptive,
    PgwardenNoLeak,
    PgwardenNoLeakAsync,
    PsycopgPool,
    PsycopgPoolAsync,
)
from impls_others import Asyncpg, AsyncpgNoReset
from memory import Memory

__all__ = ["Check", "evaluate", "render_checks"]

T1_MAX_RATIO = 0.5  # pgwarden's net acquire time / psycopg_pool's
T2_MIN_VS_DIRECT = 0.95
T3_MIN_VS_POOL = 1.2
T3_MIN_JAIN = 0.95
T4_MIN_VS_DIRECT = 0.8
T6_MAX_APART = 0.10
T7_MAX_MB = 5.0

ACQUIRE, SELECT1, TXN = "acquire", "select1-1x4", "txn-16x8"
CONTENDED = ("select1-64x4", "select1-64x16")


@dataclass(frozen=True)
class Check:
    """One line of the summary: a target (or part of one) for one kind."""

    target: int
    title: str
    kind: str  # "sync", "async", "sync-noadaptive"
    measured: str
    threshold: str
    passed: bool | None  # None: not measured in this run
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Names:
    kind: str
    direct: str
    pool: str  # psycopg_pool without checks: the counterpart
    ours: str
    noleak: str


_KINDS = (
    _Names("sync", Direct.name, PsycopgPool.name, Pgwarden.name, PgwardenNoLeak.name),
    _Names(
        "async",
        DirectAsync.name,
        PsycopgPoolAsync.name,
        PgwardenAsync.name,
        PgwardenNoLeakAsync.name,
    ),
)
# Target 3 again, with adaptive_concurrency off (on by default for threads):
# what the option is worth, beside the defaults' verdict.
_NOADAPTIVE = _Names(
    "sync-noadaptive",
    Direct.name,
    PsycopgPool.name,
    PgwardenNoAdaptive.name,
    "",  # target 6 is not checked for it
)


def _median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


class _Data:
    """The good samples, by cell, implementation and round."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.by = {
            (s.cell, s.impl, s.rep): s for s in samples if s.error is None and s.ops
        }
        self.reps = sorted({s.rep for s in samples})

    def each(self, cell: str, impl: str) -> list[Sample]:
        return [s for r in self.reps if (s := self.by.get((cell, impl, r)))]

    def median(
        self, cell: str, impl: str, f: Callable[[Sample], float]
    ) -> float | None:
        return _median(f(s) for s in self.each(cell, impl))

    def paired(
        self,
        cell: str,
        names: Sequence[str],
        f: Callable[..., float | None],
    ) -> float | None:
        """Median over the rounds where all `names` ran of f(their samples)."""
        values = []
        for r in self.reps:
            got = [self.by.get((cell, name, r)) for name in names]
            if all(got) and (v := f(*got)) is not None:
                values.append(v)
        return _median(values)


def _us(s: Sample) -> float:
    return 1e6 / s.throughput


def _net(s: Sample, ref: Sample) -> float:
    """µs per borrow and return, net of the harness's loop (direct's µs/op)."""
    return _us(s) - _us(ref)


def _ratio(a: Sample, b: Sample) -> float:
    return a.throughput / b.throughput


def _verdict(value: float | None, ok: Callable[[float], bool]) -> bool | None:
    return None if value is None else ok(value)


def _all(verdicts: Iterable[bool | None]) -> bool | None:
    seen = list(verdicts)
    if False in seen:
        return False
    return None if None in seen else True


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _f(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"


# -- targets 1 to 6 --------------------------------------------------------------


def _t1(d: _Data, n: _Names) -> Check:
    ratio = d.paired(
        ACQUIRE, (n.ours, n.pool, n.direct), lambda a, b, r: _net(a, r) / _net(b, r)
    )
    gross = d.paired(ACQUIRE, (n.ours, n.pool), lambda a, b: _us(a) / _us(b))
    ours = d.paired(ACQUIRE, (n.ours, n.direct), _net)
    pool = d.paired(ACQUIRE, (n.pool, n.direct), _net)
    loop = d.median(ACQUIRE, n.direct, _us)
    return Check(
        1,
        "acquire+release, 1 worker, vs psycopg_pool",
        n.kind,
        f"{_f(ours)} vs {_f(pool)} µs net of the loop's {_f(loop)}: {_x(ratio)}"
        f" (gross {_x(gross)})",
        f"<= {T1_MAX_RATIO:.2f}x",
        _verdict(ratio, lambda v: v <= T1_MAX_RATIO),
        {
            "ratio": ratio,
            "gross_ratio": gross,
            "pgwarden_net_us": ours,
            "psycopg_pool_net_us": pool,
            "loop_us": loop,
        },
    )


def _t2(d: _Data, n: _Names, probes: Sequence[Probed] | None) -> Check:
    ratio = d.paired(SELECT1, (n.ours, n.direct), _ratio)
    pool = d.paired(SELECT1, (n.pool, n.direct), _ratio)
    probe = next((p for p in probes or () if p.impl == n.ours), None)
    if probe is None:
        guarantee, safe = "guarantee not probed", None
    elif probe.error:
        guarantee, safe = "guarantee probe FAILED", False
    else:
        guarantee = f"dead handed out {probe.dead} of {probe.borrows}"
        safe = probe.dead == 0
    fast = _verdict(ratio, lambda v: v >= T2_MIN_VS_DIRECT)
    return Check(
        2,
        "SELECT 1 1x4 vs direct; guarantee",
        n.kind,
        f"{_x(ratio)} direct (psycopg_pool {_x(pool)}); {guarantee}",
        f">= {T2_MIN_VS_DIRECT:.2f}x, 0 dead",
        _all((fast, safe)) if probes is not None else fast,
        {
            "ratio": ratio,
            "psycopg_pool_ratio": pool,
            "dead": None if probe is None else probe.dead,
            "borrows": None if probe is None else probe.borrows,
        },
    )


def _t3(d: _Data, n: _Names, cell: str) -> list[Check]:
    tag = cell.removeprefix("select1-")
    ratio = d.paired(cell, (n.ours, n.pool), _ratio)
    ours_tp = d.median(cell, n.ours, lambda s: s.throughput)
    pool_tp = d.median(cell, n.pool, lambda s: s.throughput)
    jain = _median(j for s in d.each(cell, n.ours) if (j := s.jain) is not None)
    pool_jain = _median(j for s in d.each(cell, n.pool) if (j := s.jain) is not None)
    starved = max((s.starved for s in d.each(cell, n.ours)), default=None)
    p99 = d.paired(cell, (n.ours, n.pool), lambda a, b: a.waits["p99"] / b.waits["p99"])
    ours_p99 = d.median(cell, n.ours, lambda s: s.waits["p99"] * 1e6)
    pool_p99 = d.median(cell, n.pool, lambda s: s.waits["p99"] * 1e6)
    fair = _all(
        (
            _verdict(jain, lambda v: v >= T3_MIN_JAIN),
            _verdict(starved, lambda v: v == 0),
        )
    )
    return [
        Check(
            3,
            f"{tag} throughput vs psycopg_pool",
            n.kind,
            f"{_f(ours_tp)} vs {_f(pool_tp)} ops/s: {_x(ratio)}",
            f">= {T3_MIN_VS_POOL:.2f}x",
            _verdict(ratio, lambda v: v >= T3_MIN_VS_POOL),
            {
                "cell": cell,
                "ratio": ratio,
                "pgwarden_ops_s": ours_tp,
                "psycopg_pool_ops_s": pool_tp,
            },
        ),
        Check(
            3,
            f"{tag} fairness",
            n.kind,
            f"Jain {_f(jain, 3)} (psycopg_pool {_f(pool_jain, 3)}),"
            f" starved {'-' if starved is None else starved}",
            f"Jain >= {T3_MIN_JAIN:.2f}, 0 starved",
            fair,
            {
                "cell": cell,
                "jain": jain,
                "psycopg_pool_jain": pool_jain,
                "starved": starved,
            },
        ),
        Check(
            3,
            f"{tag} wait p99 vs psycopg_pool",
            n.kind,
            f"{_f(ours_p99)} vs {_f(pool_p99)} µs: {_x(p99)}",
            "<= 1.00x (5% buckets)",
            _verdict(p99, lambda v: v <= 1.0),
            {
                "cell": cell,
                "ratio": p99,
                "pgwarden_p99_us": ours_p99,
                "psycopg_pool_p99_us": pool_p99,
            },
        ),
    ]


def _t4(d: _Data, n: _Names) -> Check:
    ratio = d.paired(TXN, (n.ours, n.direct), _ratio)
    pool = d.paired(TXN, (n.pool, n.direct), _ratio)
    cpu = {
        name: d.median(TXN, name, lambda s: s.cpu_per_op * 1e6)
        for name in (n.ours, n.pool, n.direct)
    }
    return Check(
        4,
        "txn 16x8 vs direct",
        n.kind,
        f"{_x(ratio)} direct (psycopg_pool {_x(pool)}); client CPU/txn"
        f" {_f(cpu[n.ours])} µs (psycopg_pool {_f(cpu[n.pool])},"
        f" direct {_f(cpu[n.direct])})",
        f">= {T4_MIN_VS_DIRECT:.2f}x",
        _verdict(ratio, lambda v: v >= T4_MIN_VS_DIRECT),
        {"ratio": ratio, "psycopg_pool_ratio": pool, "cpu_us_per_txn": cpu},
    )


def _t6(d: _Data, n: _Names) -> Check:
    ratio = d.paired(
        ACQUIRE, (n.ours, n.noleak, n.direct), lambda a, b, r: _net(a, r) / _net(b, r)
    )
    on = d.paired(ACQUIRE, (n.ours, n.direct), _net)
    off = d.paired(ACQUIRE, (n.noleak, n.direct), _net)
    apart = None if ratio is None else abs(ratio - 1.0)
    return Check(
        6,
        "leak detection on vs off, acquire",
        n.kind,
        f"{_f(on)} vs {_f(off)} µs net: "
        + ("-" if apart is None else f"{apart:.1%} apart"),
        f"<= {T6_MAX_APART:.0%} apart",
        _verdict(apart, lambda v: v <= T6_MAX_APART),
        {"on_over_off": ratio, "apart": apart, "on_net_us": on, "off_net_us": off},
    )


def _t5(d: _Data, async_checks: Sequence[Check]) -> Check:
    n = _KINDS[1]
    mine = [c for c in async_checks if c.target in (1, 2, 3, 4)]
    passed = sum(1 for c in mine if c.passed)
    beside: dict[str, float | None] = {}
    for name in (Asyncpg.name, AsyncpgNoReset.name):
        beside[f"{name} acquire net µs"] = d.paired(ACQUIRE, (name, n.direct), _net)
        beside[f"{name} select1-1x4 vs direct"] = d.paired(
            SELECT1, (name, n.direct), _ratio
        )
        for cell in CONTENDED:
            beside[f"{name} {cell} vs psycopg_pool"] = d.paired(
                cell, (name, n.pool), _ratio
            )
        beside[f"{name} txn vs direct"] = d.paired(TXN, (name, n.direct), _ratio)
    a = Asyncpg.name
    return Check(
        5,
        "asyncio: 1-4 vs AsyncConnectionPool",
        "async",
        f"{passed} of {len(mine)} async checks pass; asyncpg beside: acquire"
        f" {_f(beside[f'{a} acquire net µs'])} µs net,"
        f" select1 {_x(beside[f'{a} select1-1x4 vs direct'])} direct,"
        f" 64x4 {_x(beside[f'{a} select1-64x4 vs psycopg_pool'])} and"
        f" 64x16 {_x(beside[f'{a} select1-64x16 vs psycopg_pool'])} psycopg_pool,"
        f" txn {_x(beside[f'{a} txn vs direct'])} direct",
        "all async checks of 1-4",
        _all(c.passed for c in mine),
        {"passed": passed, "checks": len(mine), "asyncpg": beside},
    )


# -- target 7 ---------------------------------------------------------------------


def _t7(memory: Memory | None) -> list[Check]:
    out = []
    for kind in ("sync", "async"):
        over = memory.overhead(kind) if memory else None
        if over is None:
            why = memory.error if memory and memory.error else "not measured"
            out.append(
                Check(
                    7,
                    "memory: pool of 40 + monitor",
                    kind,
                    why,
                    f"< {T7_MAX_MB:g} MB",
                    None,
                )
            )
            continue
        out.append(
            Check(
                7,
                "memory: pool of 40 + monitor",
                kind,
                f"+{over['total_mb']:.1f} MB over 40 plain connections (about:"
                f" import {over['import_mb']:.1f}, pool {over['pool_mb']:.1f},"
                f" monitor check {over['monitor_check_mb']:.1f}, metrics"
                f" registry {over['metrics_mb']:.1f}; one plain connection"
                f" {over['per_connection_mb']:.2f})",
                f"< {T7_MAX_MB:g} MB",
                over["total_mb"] < T7_MAX_MB,
                over,
            )
        )
    return out


def evaluate(
    samples: Sequence[Sample],
    probes: Sequence[Probed] | None,
    memory: Memory | None,
) -> list[Check]:
    """Every target's checks, for threads and for asyncio."""
    d = _Data(samples)
    by_kind: dict[str, list[Check]] = {}
    for n in _KINDS:
        by_kind[n.kind] = [
            _t1(d, n),
            _t2(d, n, probes),
            *(c for cell in CONTENDED for c in _t3(d, n, cell)),
            _t4(d, n),
            _t6(d, n),
        ]
    checks = [*by_kind["sync"], *by_kind["async"], _t5(d, by_kind["async"])]
    checks += (c for cell in CONTENDED for c in _t3(d, _NOADAPTIVE, cell))
    checks += _t7(memory)
    order = {"sync": 0, "sync-noadaptive": 1, "async": 2}
    return sorted(checks, key=lambda c: (c.target, order[c.kind]))


# -- text -------------------------------------------------------------------------

_HEADERS = ("#", "target", "kind", "result", "threshold", "measured (medians)")
_MEASURED_WIDTH = 58


def _result(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def _rows(checks: Sequence[Check]) -> list[list[str]]:
    return [
        [str(c.target), c.title, c.kind, _result(c.passed), c.threshold, c.measured]
        for c in checks
    ]


def _plain(checks: Sequence[Check], out: TextIO) -> None:
    rows = _rows(checks)
    widths = [max(len(r[i]) for r in [list(_HEADERS), *rows]) for i in range(5)]
    indent = sum(widths) + 2 * len(widths)

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=False))

    print(line(_HEADERS[:5]) + "  " + _HEADERS[5], file=out)
    print("-" * (indent + _MEASURED_WIDTH), file=out)
    for row in rows:
        wrapped = textwrap.wrap(row[5], _MEASURED_WIDTH) or [""]
        print(line(row[:5]) + "  " + wrapped[0], file=out)
        for more in wrapped[1:]:
            print(" " * indent + more, file=out)


def _rich(checks: Sequence[Check], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    table = Table(title=title, title_justify="left")
    for header in _HEADERS:
        table.add_column(header, overflow="fold")
    for check, row in zip(checks, _rows(checks), strict=True):
        style = {True: "green", False: "red", None: "yellow"}[check.passed]
        row[3] = f"[{style}]{row[3]}[/{style}]"
        table.add_row(*row)
    console.print(table)


def render_checks(checks: Sequence[Check], out: TextIO, *, fancy: bool) -> None:
    """Print the targets summary, with rich if `fancy` (and installed)."""
    title = (
        "targets: pgwarden with its defaults (test_on_borrow, leak detection on,"
        " adaptive_concurrency on for threads);"
        " sync-noadaptive: the same with adaptive_concurrency=False"
    )
    if fancy:
        try:
            _rich(checks, title)
            return
        except ImportError:
            pass
    print(f"\n{title}", file=out)
    _plain(checks, out)
