"""What `pool.stats()` returns: a frozen picture of one pool, taken without I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from . import _messages
from ._core import BUSY, CHECKING, WAIT_BUCKETS, PoolCore


@dataclass(frozen=True, slots=True)
class LaneStats:
    """One lane's use of the pool."""

    in_use: int
    waiting: int
    reserved: int
    limit: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A consistent picture of one pool at one instant.

    Gauges describe now; `*_total` counters count since the pool was created.
    Wait percentiles cover every borrow so far, a borrow served at once counting
    as a wait of 0.
    """

    name: str
    min_size: int
    max_size: int
    size: int  # connections open or being opened
    idle: int
    in_use: int
    opening: int
    checking: int  # idle connections taken aside to be validated
    waiting: int
    # Connections that may be on loan at once while callers queue,
    # reservations included: max_size, or less while adaptive_concurrency
    # holds lending back (then one more for each borrow on loan for 0.1 s
    # past its lane's reservation, as of the last maintenance step).
    lend_limit: int
    lanes: Mapping[str, LaneStats]
    borrowed_total: int
    timeouts_total: int
    overloaded_total: int
    validation_failures_total: int
    evictions_total: int
    leaks_total: int
    reclaimed_total: int
    connections_opened_total: int
    connections_closed_total: int
    connection_errors_total: int
    connections_lost_total: int
    longest_held_seconds: float
    wait_p50_seconds: float
    wait_p95_seconds: float
    wait_p99_seconds: float
    wait_max_seconds: float
    wait_sum_seconds: float
    # Cumulative borrow counts by wait upper bound (seconds), finite bounds
    # only; every borrow (borrowed_total) waited less than +Inf.
    wait_histogram: tuple[tuple[float, int], ...]
    server_down: bool
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same field names."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What a pool knows about one of its connections (see `describe()`).

    The backend `pid` is the key to join with `pg_stat_activity`.
    """

    pid: int
    state: str  # "idle", "in_use" or "checking"
    age_seconds: float  # since it was opened
    lane: str | None  # while in use
    held_seconds: float | None  # while in use
    acquired_at: str | None  # "file:line in function" of the borrower, while in use
    holder: str | None  # "thread 'x'" or "task 'y'", while in use
    leak_suspected: bool  # held past leak_detection_threshold

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(core: PoolCore, now: float) -> tuple[ConnectionInfo, ...]:
    """Describe every open connection of `core` (under the pool's lock)."""
    out = []
    for e in core.entries:
        busy = e.state == BUSY
        state = "in_use" if busy else "checking" if e.state == CHECKING else "idle"
        out.append(
            ConnectionInfo(
                pid=e.pid,
                state=state,
                age_seconds=now - e.created_at,
                lane=e.lane.name if busy and e.lane else None,
                held_seconds=now - e.held_since if busy else None,
                acquired_at=_messages.where(e) if busy else None,
                holder=_messages.holder_name(e.holder) if busy else None,
                leak_suspected=busy and e.leak_reported,
            )
        )
    out.sort(key=lambda c: -(c.held_seconds or -1.0))
    return tuple(out)


def snapshot(core: PoolCore, name: str, now: float) -> PoolStats:
    """Read `core` (under the pool's lock) into a `PoolStats`."""
    held = [now - e.held_since for e in core.entries if e.state == BUSY]
    return PoolStats(
        name=name,
        min_size=core.min_size,
        max_size=core.max_size,
        size=core.size,
        idle=len(core.idle),
        in_use=core.busy,
        opening=core.opening,
        checking=core.checking,
        waiting=core.n_waiting,
        lend_limit=core.cap,
        lanes={
            lane.name: LaneStats(lane.in_use, lane.n_waiting, lane.reserved, lane.limit)
            for lane in core.lanes.values()
        },
        borrowed_total=core.borrowed_total,
        timeouts_total=core.timeouts_total,
        overloaded_total=core.overloaded_total,
        validation_failures_total=core.validation_failures_total,
        evictions_total=core.evictions_total,
        leaks_total=core.leaks_total,
        reclaimed_total=core.reclaimed_total,
        connections_opened_total=core.opened_total,
        connections_closed_total=core.closed_total,
        connection_errors_total=core.connect_errors_total,
        connections_lost_total=core.lost_total,
        longest_held_seconds=max(held, default=0.0),
        wait_p50_seconds=core.wait_percentile(0.50),
        wait_p95_seconds=core.wait_percentile(0.95),
        wait_p99_seconds=core.wait_percentile(0.99),
        wait_max_seconds=core.wait_max,
        wait_sum_seconds=core.wait_sum,
        wait_histogram=_cumulative_waits(core),
        server_down=core.down,
        last_error=core.last_error,
    )


def _cumulative_waits(core: PoolCore) -> tuple[tuple[float, int], ...]:
    seen = core.borrowed_total - core.waited_total  # served at once: waits of 0
    out = []
    for bound, count in zip(WAIT_BUCKETS[:-1], core.wait_counts, strict=False):
        seen += count
        out.append((bound, seen))
    return tuple(out)
