"""A pool's `PoolStats` as people read them: a rich view, or one plain line."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pgwarden.pool import LaneStats, PoolStats

from ._common import duration_text

__all__ = ["shown_lanes", "stats_line", "stats_view"]

_DEFAULT_LANE = "default"


def shown_lanes(stats: PoolStats) -> list[str]:
    """The lanes worth a row: all but an unused ``default`` lane next to others."""
    return [
        name
        for name, lane in stats.lanes.items()
        if not (
            name == _DEFAULT_LANE
            and len(stats.lanes) > 1
            and lane.in_use == lane.waiting == 0
        )
    ]


def stats_line(stats: PoolStats) -> str:
    """The stats on one line, for logs and pipes."""
    lanes = "  ".join(
        _lane_text(name, stats.lanes[name]) for name in shown_lanes(stats)
    )
    return (
        f"size {stats.size}/{stats.max_size}  in use {stats.in_use}  idle"
        f" {stats.idle}  waiting {stats.waiting} | {lanes} | borrowed"
        f" {stats.borrowed_total}  timeouts {stats.timeouts_total}  leaks"
        f" {stats.leaks_total} | wait p50 {duration_text(stats.wait_p50_seconds)}"
        f"  p99 {duration_text(stats.wait_p99_seconds)}"
    )


def _lane_text(name: str, lane: LaneStats) -> str:
    text = f"{name} {lane.in_use}/{lane.limit}"
    return f"{text} ({lane.waiting} waiting)" if lane.waiting else text


def stats_view(stats: PoolStats, title: str) -> Group:
    """A title, a table of the lanes and the pool with a bar each, the counters."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("lane")
    table.add_column("in use", justify="right")
    table.add_column("", width=24)
    table.add_column("limit", justify="right")
    table.add_column("reserved", justify="right")
    table.add_column("waiting", justify="right")
    for name in shown_lanes(stats):
        lane = stats.lanes[name]
        table.add_row(
            name,
            str(lane.in_use),
            _bar(lane.in_use, lane.limit, lane.waiting),
            str(lane.limit),
            str(lane.reserved),
            str(lane.waiting),
            style=_style(lane.in_use, lane.limit, lane.waiting),
        )
    table.add_section()
    table.add_row(
        "pool",
        str(stats.in_use),
        _bar(stats.in_use, stats.max_size, stats.waiting),
        str(stats.max_size),
        "",
        str(stats.waiting),
        style="bold " + _style(stats.in_use, stats.max_size, stats.waiting),
    )
    counters = (
        f"size {stats.size}  ·  idle {stats.idle}  ·  borrowed"
        f" {stats.borrowed_total:,}  ·  timeouts {stats.timeouts_total}  ·  leaks"
        f" {stats.leaks_total}  ·  wait p50 {duration_text(stats.wait_p50_seconds)},"
        f" p99 {duration_text(stats.wait_p99_seconds)}"
    )
    return Group(Text(title, style="bold"), table, Text(counters, style="dim"))


def _style(in_use: int, limit: int, waiting: int) -> str:
    if waiting:
        return "red"
    return "yellow" if in_use >= limit else ""


def _bar(in_use: int, limit: int, waiting: int) -> ProgressBar:
    colour = "red" if waiting else "yellow" if in_use >= limit else "green"
    return ProgressBar(
        total=limit,
        completed=in_use,
        width=24,
        complete_style=colour,
        finished_style=colour,
    )
