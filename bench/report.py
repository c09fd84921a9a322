"""Turn samples into per-cell medians and ratios; print them; write JSON."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from harness import Sample
from workloads import Cell

__all__ = ["Row", "render", "summarize", "write_json"]


@dataclass(frozen=True)
class Row:
    """The medians over the rounds of one implementation on one cell.

    `ratio` is the median, over the rounds, of this implementation's
    throughput divided by the reference's (direct, same kind) in the same
    round: drift between rounds cancels out.
    """

    cell: str
    kind: str
    impl: str
    connections: int
    reference: bool
    reps: int
    failed: int
    throughput: float | None  # ops/s
    us_per_op: float | None  # wall time per operation, all workers together
    ratio: float | None
    wait_p50_us: float | None
    wait_p99_us: float | None
    cpu_us_per_op: float | None
    jain: float | None  # Jain's index over per-worker completions: median
    starved: int | None  # workers under 10% of the mean: the most in a round
    other_cores: float | None  # cores kept busy by other processes meanwhile


def _median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


def summarize(
    samples: Sequence[Sample], cells: Sequence[Cell], impls: Sequence[str]
) -> list[Row]:
    """One row per (cell, kind, implementation), ordered as `cells` and `impls`."""
    ok = [s for s in samples if s.error is None and s.ops]
    reference = {(s.cell, s.kind, s.rep): s for s in ok if s.reference}
    groups: dict[tuple[str, str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.cell, s.kind, s.impl), []).append(s)
    rows = []
    for (cell, kind, impl), group in groups.items():
        good = [s for s in group if s.error is None and s.ops]
        ratios = [
            s.throughput / ref.throughput
            for s in good
            if (ref := reference.get((s.cell, s.kind, s.rep)))
        ]
        throughput = _median(s.throughput for s in good)
        rows.append(
            Row(
                cell=cell,
                kind=kind,
                impl=impl,
                connections=group[0].connections,
                reference=group[0].reference,
                reps=len(group),
                failed=len(group) - len(good),
                throughput=throughput,
                us_per_op=1e6 / throughput if throughput else None,
                ratio=_median(ratios),
                wait_p50_us=_median(s.waits["p50"] * 1e6 for s in good),
                wait_p99_us=_median(s.waits["p99"] * 1e6 for s in good),
                cpu_us_per_op=_median(s.cpu_per_op * 1e6 for s in good),
                jain=_median(j for s in good if (j := s.jain) is not None),
                starved=max((s.starved for s in good), default=None),
                other_cores=_median(
                    s.cores.other for s in good if s.cores and s.cores.other is not None
                ),
            )
        )
    cell_ids = [cell.id for cell in cells]
    rows.sort(key=lambda r: (cell_ids.index(r.cell), impls.index(r.impl)))
    return rows


# -- text -------------------------------------------------------------------

_HEADERS = (
    "implementation",
    "conns",
    "ops/s",
    "µs/op",
    "vs direct",
    "wait p50 µs",
    "wait p99 µs",
    "CPU µs/op",
    "Jain",
    "starved",
    "other load",
)


def _num(value: float | None) -> str:
    """About three significant digits."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cells(row: Row) -> list[str]:
    conns = str(row.connections)
    if row.reference and row.connections > 1:
        conns += " (1/worker)"
    impl = row.impl + (f" ({row.failed}/{row.reps} FAILED)" if row.failed else "")
    return [
        impl,
        conns,
        _num(row.throughput),
        _num(row.us_per_op),
        "-" if row.ratio is None else f"{row.ratio:.2f}x",
        _num(row.wait_p50_us),
        _num(row.wait_p99_us),
        _num(row.cpu_us_per_op),
        "-" if row.jain is None else f"{row.jain:.3f}",
        "-" if row.starved is None else str(row.starved),
        "-" if row.other_cores is None else f"{row.other_cores:.2f}",
    ]


def _plain(rows: Sequence[Row], cells: Sequence[Cell], out: TextIO) -> None:
    table = [list(_HEADERS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADERS))]

    def line(values: Sequence[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = (v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    header = line(_HEADERS)
    for cell in cells:
        cell_rows = [r for r in rows if r.cell == cell.id]
        if not cell_rows:
            continue
        print(f"\n{cell.id}: {cell.title}", file=out)
        print(header, file=out)
        print("-" * len(header), file=out)
        kind = cell_rows[0].kind
        for row in cell_rows:
            if row.kind != kind:
                print(file=out)
                kind = row.kind
            print(line(_cells(row)), file=out)


def _rich(rows: Sequence[Row], cells: Sequence[Cell]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # don't squeeze the table into 80 columns
        console = Console(width=160)
    for cell in cells:
        cell_rows = [r for r in rows if r.cell == cell.id]
        if not cell_rows:
            continue
        table = Table(title=f"{cell.id}: {cell.title}", title_justify="left")
        for i, header in enumerate(_HEADERS):
            table.add_column(header, justify="left" if i == 0 else "right")
        kind = cell_rows[0].kind
        for row in cell_rows:
            if row.kind != kind:
                table.add_section()
                kind = row.kind
            style = "red" if row.failed else "dim" if row.reference else None
            table.add_row(*_cells(row), style=style)
        console.print(table)


def render(
    rows: Sequence[Row], cells: Sequence[Cell], out: TextIO, *, fancy: bool
) -> None:
    """Print one table per cell, with rich if `fancy` (and installed)."""
    if fancy:
        try:
            _rich(rows, cells)
            return
        except ImportError:
            pass
    _plain(rows, cells, out)


# -- JSON -------------------------------------------------------------------


def write_json(
    path: Path,
    meta: dict[str, Any],
    cells: Sequence[Cell],
    samples: Sequence[Sample],
    rows: Sequence[Row],
    extra: dict[str, Any],
) -> None:
    """Everything: the settings, the samples of every round and the summary.

    `extra` (the targets, the probes) is added at the top level.
    """
    doc = {
        "meta": meta,
        "cells": [
            {
                "id": c.id,
                "title": c.title,
                "workload": c.workload.name,
                "workload_description": c.workload.description,
                "workers": c.workers,
                "pool_size": c.pool_size,
            }
            for c in cells
        ],
        "summary": [dataclasses.asdict(r) for r in rows],
        **extra,
        "samples": [
            dataclasses.asdict(s)
            | {
                "throughput": s.throughput,
                "cpu_per_op": s.cpu_per_op,
                "jain": s.jain,
                "starved": s.starved,
            }
            for s in samples
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
