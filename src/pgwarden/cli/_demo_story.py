"""The story `pgwarden demo` plays: an SMS platform's three workloads on one pool.

The backend API sends SMS, the frontend reads, Asterisk logs call events, all
through one pool of 40 split into lanes (backend 15-20, frontend 10-15,
asterisk 5-10: reserved-limit). Scripted on top of the steady traffic:

* a backend handler opens a transaction and hangs, until the pool's leak
  detection reports it;
* rush hour: a frontend bug floods its lane with slow searches and an SMS
  campaign pushes the backend to its limit; then Asterisk gets a call storm,
  which its reserved connections serve at once.

`run_demo` plays it against a server and returns a `DemoResult`; it prints
nothing. Callers follow along through `on_event` (what happens, in sentences)
and `on_tick` (the pool's stats, every `TICK` seconds), both called from the
calling thread.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from time import monotonic

from pgwarden.config import PoolConfig
from pgwarden.pool import Pool, PooledConnection, PoolStats

from . import _sms_platform as sms
from ._common import duration_text
from ._group import one_line
from ._sms_platform import DemoError, Operation, Tables

__all__ = [
    "DEFAULT_DURATION",
    "MIN_DURATION",
    "DemoError",
    "DemoResult",
    "LaneReport",
    "Tick",
    "run_demo",
]

POOL_NAME = "sms-platform"
LANES = "backend:15:20,frontend:10:15,asterisk:5:10"
LANE_NAMES = ("backend", "frontend", "asterisk")
MAX_SIZE = 40
MIN_SIZE = 5
LEAK_THRESHOLD = 2.0

DEFAULT_DURATION = 12.0
MIN_DURATION = 3.0
TICK = 0.25
_STEP = 0.02  # how often the director looks at the pool

# Workers per workload.
_BACKEND = 6
_FRONTEND = 4
_ASTERISK = 5  # its reservation: what the lane guarantees, whatever the others do
_RUNAWAY = 26  # extra frontend callers in the rush: 30 for a limit of 15
_CAMPAIGN = 16  # extra backend senders in the rush: 22 for a limit of 20

# When the scenes start, as fractions of the duration.
_LEAK_AT = 0.1
_RUSH_AT = 0.35
_RUSH_END = 0.7
_STORM_AFTER = 1.0  # seconds into the rush at the latest, headroom gone or not

_STEADY, _RUSH, _STORM, _AFTER, _ENDING = (
    "steady",
    "rush hour",
    "call storm",
    "after the rush",
    "wrapping up",
)


@dataclass(frozen=True, slots=True)
class LaneReport:
    """What one lane went through.

    `operations`, `errors` and `worst_wait` (seconds, the longest time a
    borrow took) are measured by the workers; the peaks come from the pool's
    stats, sampled every few milliseconds.
    """

    name: str
    reserved: int
    limit: int
    operations: int
    errors: int
    worst_wait: float
    peak_in_use: int
    peak_waiting: int


@dataclass(frozen=True, slots=True)
class DemoResult:
    """How the demo went.

    `lanes` covers the whole run; `storm` only the call storm (from the moment
    the frontend flood filled its lane to the end of the rush), which lasted
    `storm_seconds`.
    """

    elapsed: float
    lanes: Mapping[str, LaneReport]
    storm: Mapping[str, LaneReport]
    storm_seconds: float
    leak_reported: bool
    leak_held: float
    stats: PoolStats
    first_error: str | None

    @property
    def operations(self) -> int:
        return sum(lane.operations for lane in self.lanes.values())

    @property
    def errors(self) -> int:
        return sum(lane.errors for lane in self.lanes.values())


@dataclass(frozen=True, slots=True)
class Tick:
    """The pool at one moment of the demo."""

    elapsed: float
    scene: str
    stats: PoolStats


EventHandler = Callable[[float, str], None]
TickHandler = Callable[[Tick], None]


def run_demo(
    dsn: str,
    duration: float = DEFAULT_DURATION,
    *,
    on_event: EventHandler | None = None,
    on_tick: TickHandler | None = None,
) -> DemoResult:
    """Play the demo against the server at `dsn` for about `duration` seconds.

    `duration` is at least `MIN_DURATION`; the run also lasts until the stuck
    handler's leak has been reported.

    Creates two tables with a random name, drops them at the end, and touches
    nothing else. Raises `ConfigError` for a malformed `dsn`,
    `psycopg.OperationalError` if the server can't be reached and `DemoError`
    if the tables can't be created. Operations that fail while the demo runs
    are counted in the result, not raised.
    """
    duration = max(duration, MIN_DURATION)
    config = PoolConfig.coerce(
        dsn,
        max_size=MAX_SIZE,
        min_size=MIN_SIZE,
        lanes=LANES,
        leak_detection_threshold=LEAK_THRESHOLD,
        application_name="pgwarden-demo",
    )
    say = on_event or _ignore_event
    with sms.demo_tables(config) as (tables, server):
        say(0.0, server)
        with Pool(config, name=POOL_NAME) as pool:
            pool.wait()
            say(0.0, f"{_describe(config)} is open")
            return _Story(pool, tables, say, on_tick or _ignore_tick).play(duration)


def _ignore_event(elapsed: float, text: str) -> None:
    pass


def _ignore_tick(tick: Tick) -> None:
    pass


def _describe(config: PoolConfig) -> str:
    lanes = ", ".join(f"{ln.name} {ln.reserved}-{ln.limit}" for ln in config.lanes)
    return (
        f"pool {POOL_NAME!r} (max_size {config.max_size}, min_size"
        f" {config.min_size}; lanes {lanes}, reserved-limit;"
        f" leak_detection_threshold {config.leak_detection_threshold:g} s)"
    )


class _Counts:
    __slots__ = ("errors", "operations", "peak_in_use", "peak_waiting", "worst_wait")

    def __init__(self) -> None:
        self.operations = 0
        self.errors = 0
        self.worst_wait = 0.0
        self.peak_in_use = 0
        self.peak_waiting = 0


class _Tally:
    """Per-lane counts for the whole run and for the call storm; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.run = {name: _Counts() for name in LANE_NAMES}
        self.storm = {name: _Counts() for name in LANE_NAMES}
        self.first_error: str | None = None

    def _windows(self, in_storm: bool) -> list[dict[str, _Counts]]:
        return [self.run, self.storm] if in_storm else [self.run]

    def waited(self, lane: str, seconds: float, in_storm: bool) -> None:
        with self._lock:
            for window in self._windows(in_storm):
                counts = window[lane]
                counts.worst_wait = max(counts.worst_wait, seconds)

    def finished(self, lane: str, in_storm: bool, error: Exception | None) -> None:
        with self._lock:
            for window in self._windows(in_storm):
                if error is None:
                    window[lane].operations += 1
                else:
                    window[lane].errors += 1
            if error is not None and self.first_error is None:
                self.first_error = f"{lane}: {one_line(error)}"

    def sample(self, stats: PoolStats, in_storm: bool) -> None:
        with self._lock:
            for window in self._windows(in_storm):
                for name, counts in window.items():
                    lane = stats.lanes[name]
                    counts.peak_in_use = max(counts.peak_in_use, lane.in_use)
                    counts.peak_waiting = max(counts.peak_waiting, lane.waiting)

    def reports(self, window: str, stats: PoolStats) -> dict[str, LaneReport]:
        with self._lock:
            counts = self.run if window == "run" else self.storm
            return {
                name: LaneReport(
                    name=name,
                    reserved=stats.lanes[name].reserved,
                    limit=stats.lanes[name].limit,
                    operations=c.operations,
                    errors=c.errors,
                    worst_wait=c.worst_wait,
                    peak_in_use=c.peak_in_use,
                    peak_waiting=c.peak_waiting,
                )
                for name, c in counts.items()
            }


Think = Callable[[], float]


def _between(low: float, high: float) -> Think:
    return lambda: random.uniform(low, high)


class _Story:
    """The workers, and the director that runs the scenes from the main thread."""

    def __init__(
        self, pool: Pool, tables: Tables, say: EventHandler, on_tick: TickHandler
    ) -> None:
        self.pool = pool
        self.tables = tables
        self.say = say
        self.on_tick = on_tick
        self.tally = _Tally()
        self.threads: list[threading.Thread] = []
        self.done = threading.Event()  # the run is over: workers finish
        self.rush_over = threading.Event()
        self.storming = threading.Event()
        self.abort = threading.Event()  # interrupted: even the stuck handler goes
        self.leak_held = 0.0
        self.start = monotonic()

    # -- the director ---------------------------------------------------------

    def play(self, duration: float) -> DemoResult:
        scene = _STEADY
        leak_at, rush_at, rush_end = (
            duration * f for f in (_LEAK_AT, _RUSH_AT, _RUSH_END)
        )
        storm_start = storm_end = 0.0
        leak_started = False
        next_tick = 0.0
        self.start = monotonic()
        self._steady_traffic()
        try:
            while True:
                now = monotonic() - self.start
                stats = self.pool.stats()
                self.tally.sample(stats, self.storming.is_set())
                if not leak_started and now >= leak_at:
                    leak_started = True
                    self._stuck_handler()
                if scene == _STEADY and now >= rush_at:
                    scene = _RUSH
                    self._rush_hour()
                elif scene == _RUSH and (
                    _headroom_gone(stats) or now >= rush_at + _STORM_AFTER
                ):
                    scene, storm_start = _STORM, now
                    self._call_storm(stats)
                elif scene == _STORM and now >= rush_end:
                    scene, storm_end = _AFTER, now
                    self._rush_ends(stats)
                elif scene == _AFTER and now >= duration:
                    scene = _ENDING
                    self.done.set()
                if now >= next_tick:
                    self.on_tick(Tick(now, scene, stats))
                    next_tick = (now // TICK + 1) * TICK
                if scene == _ENDING and not any(t.is_alive() for t in self.threads):
                    break
                time.sleep(_STEP)
        finally:
            self._stop_all()
        stats = self.pool.stats()
        self.on_tick(Tick(monotonic() - self.start, scene, stats))
        return DemoResult(
            elapsed=monotonic() - self.start,
            lanes=self.tally.reports("run", stats),
            storm=self.tally.reports("storm", stats),
            storm_seconds=storm_end - storm_start,
            leak_reported=stats.leaks_total > 0,
            leak_held=self.leak_held,
            stats=stats,
            first_error=self.tally.first_error,
        )

    def _event(self, text: str) -> None:
        self.say(monotonic() - self.start, text)

    def _steady_traffic(self) -> None:
        self._event(
            f"steady traffic: {_BACKEND} backend API workers send SMS,"
            f" {_FRONTEND} frontend workers read, {_ASTERISK} Asterisk workers"
            " log call events"
        )
        for i in range(_BACKEND):
            self._spawn(f"backend-{i}", "backend", sms.send_sms, _between(0.02, 0.08))
        for i in range(_FRONTEND):
            self._spawn(
                f"frontend-{i}", "frontend", sms.dashboard, _between(0.05, 0.15)
            )
        for i in range(_ASTERISK):
            self._spawn(f"asterisk-{i}", "asterisk", sms.call_events, self._ring)

    def _ring(self) -> float:
        """Asterisk's pause between calls: none during the storm."""
        return (
            random.uniform(0.0, 0.002)
            if self.storming.is_set()
            else random.uniform(0.05, 0.15)
        )

    def _stuck_handler(self) -> None:
        self._event(
            "a backend handler opens a transaction, then hangs on the SMS gateway"
            " with it still open"
        )
        thread = threading.Thread(
            target=self._hang_in_transaction, name="backend-stuck", daemon=True
        )
        thread.start()
        self.threads.append(thread)

    def _rush_hour(self) -> None:
        self._event(
            f"rush hour: a frontend bug fires {_FRONTEND + _RUNAWAY} slow searches at"
            f" once, and an SMS campaign adds {_CAMPAIGN} backend senders"
        )
        until = self.rush_over
        for i in range(_RUNAWAY):
            self._spawn(
                f"frontend-runaway-{i}", "frontend", sms.slow_search, until=until
            )
        for i in range(_CAMPAIGN):
            self._spawn(
                f"backend-campaign-{i}", "backend", sms.campaign_batch, until=until
            )

    def _call_storm(self, stats: PoolStats) -> None:
        front, back = stats.lanes["frontend"], stats.lanes["backend"]
        full = ": no headroom left in the pool" if _headroom_gone(stats) else ""
        self._event(
            f"frontend {front.in_use}/{front.limit} with {front.waiting} callers"
            f" queued, backend {back.in_use}/{back.limit}{full}. Now a call storm"
            f" hits Asterisk, {_ASTERISK} workers flat out"
        )
        self.storming.set()

    def _rush_ends(self, stats: PoolStats) -> None:
        self.storming.clear()
        self.rush_over.set()
        storm = self.tally.reports("storm", stats)
        front, star = storm["frontend"], storm["asterisk"]
        self._event(
            f"the rush is over. During the storm frontend waited up to"
            f" {duration_text(front.worst_wait)} for a connection, Asterisk (within"
            f" its {star.reserved} reserved) at most {duration_text(star.worst_wait)}"
        )

    def _stop_all(self) -> None:
        if any(t.is_alive() for t in self.threads):
            self.abort.set()
        self.storming.clear()
        self.rush_over.set()
        self.done.set()
        deadline = monotonic() + 5.0
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - monotonic()))

    # -- the workers ----------------------------------------------------------

    def _spawn(
        self,
        name: str,
        lane: str,
        operation: Operation,
        think: Think | None = None,
        until: threading.Event | None = None,
    ) -> None:
        """Start a worker doing `operation` on `lane` until the run or `until` ends."""

        def loop() -> None:
            while not (self.done.is_set() or (until and until.is_set())):
                self._operation(lane, operation)
                pause = think() if think else 0.0
                if pause and self.done.wait(pause):
                    break

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _operation(self, lane: str, operation: Operation) -> None:
        in_storm = self.storming.is_set()
        try:
            with self._borrow(lane) as conn:
                operation(conn, self.tables)
        except Exception as exc:
            self.tally.finished(lane, in_storm, exc)
        else:
            self.tally.finished(lane, in_storm, None)

    @contextmanager
    def _borrow(self, lane: str) -> Iterator[PooledConnection]:
        """A connection from `lane`, with the time the borrow took recorded."""
        in_storm = self.storming.is_set()
        asked = monotonic()
        with self.pool.connection(lane) as conn:
            self.tally.waited(lane, monotonic() - asked, in_storm)
            yield conn

    def _hang_in_transaction(self) -> None:
        in_storm = self.storming.is_set()
        asked = monotonic()
        error: Exception | None = None
        try:
            conn = self.pool.getconn("backend")
        except Exception as exc:
            self.tally.finished("backend", in_storm, exc)
            return
        took = monotonic()
        self.tally.waited("backend", took - asked, in_storm)
        try:
            sms.mark_delivered(conn, self.tables)
            # The gateway never answers: the handler stays stuck until the pool
            # reports the leak, so the story always gets its warning.
            give_up = took + LEAK_THRESHOLD + 5.0
            while (
                self.pool.stats().leaks_total == 0
                and monotonic() < give_up
                and not self.abort.wait(0.05)
            ):
                pass
        except Exception as exc:
            error = exc
        finally:
            self.leak_held = monotonic() - took
            self.pool.putconn(conn)  # rolls back the open transaction, with a warning
        self.tally.finished("backend", in_storm, error)


def _headroom_gone(stats: PoolStats) -> bool:
    """Frontend and backend at their limits, so the pool's headroom is all taken."""
    front, back = stats.lanes["frontend"], stats.lanes["backend"]
    return front.in_use >= front.limit and back.in_use >= back.limit
