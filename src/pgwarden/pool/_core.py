"""The pool's decision core: every decision about capacity, lanes and waiters.

Nothing here does I/O, starts threads or awaits. Both pools (`AsyncPool` and the
generated `Pool`) call it under their lock and do the I/O it asks for afterwards,
outside the lock. Time comes in as an argument (`now`, seconds on a monotonic
clock), so the core can be driven by a fake clock in tests.

Capacity is counted in *units*: a unit is an open connection, one being opened,
or one the pool is checking or giving back. `size` never exceeds `max_size`.

Lanes split `max_size` between workloads. Lane *i* has `reserved` units that only
it may use and a `limit` it never exceeds; the rest is shared headroom. The core
keeps `committed = sum(max(in_use_i, reserved_i))` at or below `max_size`: a lane
may take a connection when it is under its limit and either under its
reservation or there is headroom left. So a lane under its reservation can always
take one, whatever the other lanes do.
"""

from __future__ import annotations

import itertools
import math
import random
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from ..config import LaneSpec
from ._adaptive import AdaptiveLimit

DEFAULT_LANE = "default"

# Numbers for pools created without a name, shared by both kinds of pool.
pool_numbers = itertools.count(1)

# How long a connection may sit unused before a borrow checks it with a query,
# on top of the cheap liveness test (HikariCP's "alive bypass window").
ALIVE_BYPASS_WINDOW = 0.5

# Which idle connection a borrow takes, for `rotation` = 2 (the thread pool's).
# A caller borrowing again and again alternates between the two connections
# given back most recently: while one backend finishes up after its reply
# (freeing memory, flushing statistics), the next query already runs on the
# other. One thread doing SELECT 1 gets about 1.3x the throughput of a single
# connection on 2 cores (bench/). It rotates when the connection it would take
# needs no validation query, or, after a few fast borrows in a row (a steady
# caller, not a short burst), at the cost of one query to bring it in;
# otherwise it takes the most recent. The connections below those are never
# taken, so those a burst left behind still reach idle_timeout. With 1
# (asyncio's), the most recent, as a stack: an event loop is itself the
# bottleneck there, and rotating measured 3 % slower.
ROTATION = 2

# A borrowed connection with no handle attached is between hands: being lent
# (liveness test, validation query) or given back (rollback, reset query),
# each step bounded by validation_timeout. Past this many seconds beyond two
# validation timeouts, a hand-over is normally long over: a KeyboardInterrupt
# stopped this one halfway, and the pool drops the connection rather than lose
# its slot for good.
STRANDED_AFTER = 30.0

# A caller the adaptive limit has held back this long, while the pool had room
# (idle connections, or room to open some), lifts it: every connection is lent
# again, at the next maintenance step.
STALL_AFTER = 1.0

# While the adaptive limit is below max_size, a borrow on loan this long stops
# counting against it, so that the queue does not wait on a report or a batch.
# Maintenance runs this often (WATCH_INTERVAL) while the limit is below
# max_size and callers queue, and at its usual pace otherwise.
SLOW_BORROW = 0.1
WATCH_INTERVAL = 0.1

# While the server is known to be unreachable, a caller waits at most this long.
FAST_FAIL_WAIT = 1.0

# Reconnection backoff: first delay, growth factor, cap, relative jitter.
BACKOFF_INITIAL = 0.1
BACKOFF_FACTOR = 2.0
BACKOFF_CAP = 2.0
BACKOFF_JITTER = 0.2

# At most this many connections are being opened at once (spike elision).
MAX_CONCURRENT_CONNECTS = 3

# Upper bounds (seconds) of the acquire-wait histogram buckets.
WAIT_BUCKETS: tuple[float, ...] = (
    *(b * 10.0**e for e in range(-5, 2) for b in (1.0, 2.0, 5.0)),
    math.inf,
)

# Entry states.
IDLE = 0
BUSY = 1
CHECKING = 2
CLOSED = 3


class Waiter(Protocol):
    """What the core needs from a caller waiting for a connection."""

    entry: Entry | None
    error: BaseException | None
    lane: Lane
    seq: int
    since: float
    deadline: float
    state: int

    def accepts(self) -> bool:
        """Whether the waiter can still take a connection (not cancelled)."""

    def wake(self) -> None:
        """Wake the waiter up; `entry` or `error` is already set."""


# Waiter states.
WAITING = 0
SERVED = 1
GONE = 2


def wait_chunk(waiter: Waiter, now: float) -> float:
    """How long a waiter waits before its pool looks at it again (to time it
    out, or fail it fast while the server is down): until its deadline, and
    at most `FAST_FAIL_WAIT`."""
    return max(min(waiter.deadline - now, FAST_FAIL_WAIT), 0.0)


class Entry:
    """One connection the pool owns, with what the pool knows about it."""

    __slots__ = (
        "abandoned",
        "conn",
        "created_at",
        "doomed",
        "expires_at",
        "handle",
        "held_since",
        "holder",
        "lane",
        "last_checked",
        "last_ok",
        "last_used",
        "leak_reported",
        "pid",
        "returned_at",
        "site",
        "state",
    )

    def __init__(self, conn: Any, pid: int, now: float, expires_at: float) -> None:
        self.conn = conn
        self.pid = pid
        self.created_at = now
        self.expires_at = expires_at
        self.last_ok = now  # last time the connection was known to work
        self.last_used = now  # last given back (for idle_timeout)
        self.last_checked = now  # last validation query (for eviction order)
        self.state = IDLE
        self.lane: Lane | None = None
        self.held_since = 0.0
        self.returned_at = 0.0  # when its last give-back began
        self.site: tuple[Any, int] | None = None  # borrower's (code, f_lasti)
        self.holder: Any = None  # thread ident or asyncio task of the borrower
        self.leak_reported = False
        # The handle lent out last: attached while on loan, kept detached
        # afterwards so the next borrow can reuse it if nobody else holds it.
        self.handle: Any = None
        self.doomed = False  # the server said it is ending this session
        self.abandoned = False  # cut off while in use: never closed, just dropped

    def __repr__(self) -> str:
        states = ("idle", "busy", "checking", "closed")
        return f"<Entry pid={self.pid} {states[self.state]}>"


class Lane:
    """A named budget of connections (see the module docstring)."""

    __slots__ = ("in_use", "limit", "n_waiting", "name", "reserved", "waiters")

    def __init__(self, spec: LaneSpec) -> None:
        self.name = spec.name
        self.reserved = spec.reserved
        self.limit = spec.limit
        self.in_use = 0
        self.waiters: deque[Waiter] = deque()
        self.n_waiting = 0

    def __repr__(self) -> str:
        return (
            f"<Lane {self.name} in_use={self.in_use} waiting={self.n_waiting}"
            f" reserved={self.reserved} limit={self.limit}>"
        )


class Actions:
    """I/O the shell must do after a maintenance step, outside the lock."""

    __slots__ = ("check", "close", "connects", "leaks", "served")

    def __init__(self) -> None:
        self.close: list[tuple[Entry, str]] = []  # entry, reason
        self.check: list[Entry] = []  # idle entries to validate
        self.connects = 0  # new connections to start opening
        self.leaks: list[Entry] = []  # entries held past the leak threshold
        self.served: list[Waiter] = []  # waiters to wake


class PoolCore:
    """State and decisions of one pool. Call every method under the pool's lock."""

    def __init__(
        self,
        *,
        min_size: int,
        max_size: int,
        lanes: Sequence[LaneSpec] = (),
        max_waiting: int = 0,
        max_lifetime: float = 0.0,
        idle_timeout: float = 30.0,
        eviction_interval: float = 10.0,
        tests_per_eviction_run: int = 3,
        test_while_idle: bool = True,
        leak_threshold: float = 0.0,
        rotation: int = ROTATION,
        adaptive: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.min_size = min_size
        self.max_size = max_size
        self.max_waiting = max_waiting
        self.max_lifetime = max_lifetime
        self.idle_timeout = idle_timeout
        self.eviction_interval = eviction_interval
        self.tests_per_eviction_run = tests_per_eviction_run
        self.test_while_idle = test_while_idle
        self.leak_threshold = leak_threshold
        self.rotation = rotation
        self._quick_borrows = 0  # borrows in a row that came fast (see ROTATION)
        self._rng = rng or random.Random()

        self.lanes: dict[str, Lane] = {s.name: Lane(s) for s in lanes}
        # Added by the pool, its limit follows max_size; a configured one keeps its own.
        self._default_added = DEFAULT_LANE not in self.lanes
        if self._default_added:
            self.lanes[DEFAULT_LANE] = Lane(LaneSpec(DEFAULT_LANE, 0, max_size))
        self.default_lane = self.lanes[DEFAULT_LANE]
        self.committed = sum(lane.reserved for lane in self.lanes.values())
        # How many connections may be lent at once, reservations included:
        # max_size, or less while the adaptive limit holds lending back (plus
        # `_slow`, its borrows on loan for SLOW_BORROW, at the last look).
        self.cap = max_size
        self._slow = 0
        self.adaptive = (
            AdaptiveLimit(self.committed + 1, max_size) if adaptive else None
        )
        self._woken: list[Waiter] = []  # served besides the one release() returns
        # Set when a give-back lowered the adaptive limit with callers queued:
        # the shell wakes maintenance up to watch it (see `watching`).
        self.watch_wanted = False

        self.idle: list[Entry] = []  # the last one is the most recently given back
        self.entries: set[Entry] = set()  # every open connection
        self.opening = 0
        self.busy = 0
        self.checking = 0
        self.n_waiting = 0
        self._seq = 0
        self.closed = False
        self._to_close: list[tuple[Entry, str]] = []

        # Server reachability.
        self.down = False
        self.last_error: str | None = None
        self.last_error_at = 0.0
        self._failures = 0
        self._invalid_streak = 0  # validation queries failed in a row
        self.last_validation_error = ""
        self.next_connect_at = 0.0
        self.suspect_before = -math.inf
        self.next_eviction_at = 0.0

        # Counters.
        self.borrowed_total = 0
        self.timeouts_total = 0
        self.overloaded_total = 0
        self.validation_failures_total = 0
        self.evictions_total = 0
        self.leaks_total = 0
        self.reclaimed_total = 0
        self.opened_total = 0
        self.closed_total = 0
        self.connect_errors_total = 0
        self.lost_total = 0
        self.wait_counts = [0] * len(WAIT_BUCKETS)
        self.waited_total = 0
        self.wait_sum = 0.0
        self.wait_max = 0.0

    # -- sizes --------------------------------------------------------------

    @property
    def size(self) -> int:
        """Connections open or being opened."""
        return len(self.entries) + self.opening

    @property
    def watching(self) -> bool:
        """Whether maintenance must run every `WATCH_INTERVAL`: while the
        adaptive limit may hold callers back (see `_watch_limit`)."""
        adaptive = self.adaptive
        return (
            adaptive is not None
            and adaptive.limit < self.max_size
            and bool(self.n_waiting)
        )

    def can_take(self, lane: Lane) -> bool:
        """Whether `lane` may take one more connection now (for a caller
        that queues: the adaptive limit applies)."""
        return lane.in_use < lane.limit and (
            lane.in_use < lane.reserved or self.committed < self.cap
        )

    # -- borrowing ----------------------------------------------------------

    def try_acquire(self, lane: Lane, now: float) -> Entry | None:
        """Take an idle connection for `lane`, or return None if it must wait.

        Connections past their lifetime are not handed out: they are marked
        for closing (`pop_to_close`) and the next one is tried.
        """
        idle = self.idle
        in_use = lane.in_use
        # can_take() and _lease(), inlined: this is the hot path.
        if not idle or in_use >= lane.limit:
            return None
        owed = in_use < lane.reserved
        # The adaptive limit (cap) holds lending back only while callers queue.
        if (
            not owed
            and self.committed >= self.cap
            and (self.committed >= self.max_size or self.n_waiting)
        ):
            return None
        while idle:
            i = len(idle) - 1
            rotation = self.rotation
            if i and rotation > 1:
                j = i + 1 - rotation if i >= rotation else 0
                if now - idle[j].last_ok <= ALIVE_BYPASS_WINDOW:
                    i = j  # needs no validation query
                elif now - idle[i].last_ok <= ALIVE_BYPASS_WINDOW / rotation:
                    # Borrows come fast: after a few in a row, one validation
                    # query brings the older connection into the cycle. A
                    # short burst never pays it.
                    self._quick_borrows += 1
                    if self._quick_borrows > rotation:
                        i = j
                else:
                    self._quick_borrows = 0
            entry = idle.pop(i)
            if entry.expires_at <= now:
                self._discard(entry, "max_lifetime")
                continue
            entry.state = BUSY
            entry.lane = lane
            entry.held_since = now
            entry.leak_reported = False
            if not owed:
                self.committed += 1
            lane.in_use = in_use + 1
            self.busy += 1
            self.borrowed_total += 1
            return entry
        return None

    def try_acquire_exempt(self, lane: Lane, now: float, holder: Any) -> Entry | None:
        """`try_acquire()` past the adaptive limit, for a caller it must not
        hold back: one that finds nobody waiting, one that `max_waiting` would
        refuse, one that holds a connection already (held back, it could be
        waiting on itself).

        With no idle connection to give it but room to open one, the limit is
        lifted, so that one is opened for it (`wanted_connects`).
        """
        cap = self.cap
        if cap >= self.max_size:
            return None
        n_waiting = self.n_waiting
        if not (
            not n_waiting
            or (self.max_waiting and n_waiting >= self.max_waiting)
            or any(e.holder == holder for e in self.entries if e.state == BUSY)
        ):
            return None
        self.cap = self.max_size
        try:
            entry = self.try_acquire(lane, now)
        finally:
            self.cap = cap
        if (
            entry is None
            and self.adaptive is not None
            and not self.idle
            and self.size < self.max_size
            and self.committed < self.max_size
            and lane.in_use < lane.limit
        ):
            self.adaptive.lift(now)
            self.cap = self.adaptive.limit
        return entry

    def _lease(self, entry: Entry, lane: Lane, now: float) -> None:
        entry.state = BUSY
        entry.lane = lane
        entry.held_since = now
        entry.leak_reported = False
        if lane.in_use >= lane.reserved:
            self.committed += 1
        lane.in_use += 1
        self.busy += 1
        self.borrowed_total += 1

    def enqueue(self, waiter: Waiter, now: float, deadline: float) -> None:
        """Put `waiter` at the back of its lane's queue.

        Raise OverflowError when `max_waiting` callers already wait, unless
        this one is within its lane's reservation: another lane's queue must
        not lock a lane out of its own connections.
        """
        lane = waiter.lane
        if (
            self.max_waiting
            and self.n_waiting >= self.max_waiting
            and lane.in_use + lane.n_waiting >= lane.reserved
        ):
            self.overloaded_total += 1
            raise OverflowError
        self._seq += 1
        waiter.seq = self._seq
        waiter.since = now
        waiter.deadline = deadline
        waiter.state = WAITING
        lane.waiters.append(waiter)
        lane.n_waiting += 1
        self.n_waiting += 1

    def expire_waiter(self, waiter: Waiter, now: float) -> bool:
        """Decide whether a waiter whose wait chunk ran out gives up now.

        Return True if it gave up (it is removed from the queue): its deadline
        passed, or the server is known to be down and it has waited
        `FAST_FAIL_WAIT`. Return False if it must keep waiting or was served.
        """
        if waiter.state != WAITING:
            return False
        if now >= waiter.deadline or (
            self.down and now - waiter.since >= FAST_FAIL_WAIT
        ):
            self._forget_waiter(waiter)
            self.timeouts_total += 1
            return True
        return False

    def waiting(self) -> list[Waiter]:
        """The callers waiting now, in every lane."""
        return [
            w
            for lane in self.lanes.values()
            for w in lane.waiters
            if w.state == WAITING
        ]

    def cancel_waiter(self, waiter: Waiter) -> bool:
        """Remove a waiter that gave up. False if it was already served."""
        if waiter.state != WAITING:
            return False
        self._forget_waiter(waiter)
        return True

    def _forget_waiter(self, waiter: Waiter) -> None:
        waiter.state = GONE
        waiter.lane.n_waiting -= 1
        self.n_waiting -= 1
        # Gone waiters are dropped lazily from the deque by `_next_waiter`,
        # except that a long queue of them is not left behind.
        lane = waiter.lane
        if not lane.n_waiting:
            lane.waiters.clear()

    def record_wait(self, seconds: float) -> None:
        """Account for a caller that had to wait `seconds` for its connection."""
        self.wait_counts[bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.waited_total += 1
        self.wait_sum += seconds
        if seconds > self.wait_max:
            self.wait_max = seconds

    def _next_waiter(self) -> Waiter | None:
        """The caller to serve next.

        Callers of lanes under their reservation come first (the pool owes
        them a connection), then the longest-waiting caller among the lanes
        that may take one.
        """
        best: Waiter | None = None
        best_owed = False
        for lane in self.lanes.values():
            if not lane.n_waiting:
                continue
            waiters = lane.waiters
            # Drop heads that gave up: gone ones (already counted out) and
            # cancelled ones that haven't run yet (counted out now).
            while waiters and (waiters[0].state != WAITING or not waiters[0].accepts()):
                head = waiters.popleft()
                if head.state == WAITING:
                    self._forget_waiter(head)
            if not waiters or not self.can_take(lane):
                continue
            head = waiters[0]
            owed = lane.in_use < lane.reserved
            if best is None or (owed, -head.seq) > (best_owed, -best.seq):
                best, best_owed = head, owed
        return best

    def _serve(self, entry: Entry, now: float) -> Waiter | None:
        """Hand `entry` to the next eligible waiter, or put it back to idle."""
        if self.n_waiting:
            waiter = self._next_waiter()
            if waiter is not None:
                lane = waiter.lane
                lane.waiters.popleft()
                lane.n_waiting -= 1
                self.n_waiting -= 1
                waiter.state = SERVED
                waiter.entry = entry
                self._lease(entry, lane, now)
                self.record_wait(now - waiter.since)
                return waiter
        entry.state = IDLE
        self.idle.append(entry)
        return None

    # -- giving back --------------------------------------------------------

    def release(self, entry: Entry, now: float, reusable: bool) -> Waiter | None:
        """Take back a borrowed connection.

        With `reusable` False (broken, mid-query, rollback failed...) the
        connection is marked for closing. Otherwise it goes to the next waiter
        (returned, for the shell to wake) or back to the idle list.
        """
        # _unlease(), inlined: this is the hot path.
        if entry.state != BUSY:  # dropped as stranded while its give-back stalled
            return None
        lane = entry.lane
        assert lane is not None, entry
        in_use = lane.in_use = lane.in_use - 1
        if in_use >= lane.reserved:
            self.committed -= 1
        self.busy -= 1
        entry.lane = None
        entry.holder = None
        if reusable:
            entry.last_ok = entry.last_used = now
            if self.closed:
                reason = "pool closed"
            elif entry.expires_at <= now:
                reason = "max_lifetime"
            elif len(self.entries) + self.opening > self.max_size:
                reason = "pool resized"
            elif not self.n_waiting:
                entry.state = IDLE
                self.idle.append(entry)
                return None
            elif self.adaptive is not None and self.adaptive.ended(
                now, now - entry.held_since, in_use >= lane.reserved
            ):
                return self._limit_changed(entry, now)
            else:
                return self._serve(entry, now)
            self._discard(entry, reason)
        else:
            self._discard(entry, "broken")
        # The borrower's lane has room again: an idle connection may now suit a
        # waiter that could not take one before.
        return self._serve_from_idle(now)

    def _serve_from_idle(self, now: float) -> Waiter | None:
        if self.n_waiting and self.idle:
            return self._serve(self.idle.pop(), now)
        return None

    # -- the adaptive limit -------------------------------------------------

    def _limit_changed(self, entry: Entry, now: float) -> Waiter | None:
        """release(), once the adaptive limit moved: hand `entry` on under
        the new limit, and serve whoever a raised one lets in (`pop_woken`)."""
        assert self.adaptive is not None
        self.cap = min(self.max_size, self.adaptive.limit + self._slow)
        self.watch_wanted = self.watching
        waiter = self._serve(entry, now)
        self._serve_more(now)
        if waiter is None and self._woken:
            waiter = self._woken.pop()
        return waiter

    def _serve_more(self, now: float) -> None:
        while (waiter := self._serve_from_idle(now)) is not None:
            self._woken.append(waiter)

    def pop_woken(self) -> list[Waiter]:
        """Waiters served besides the one `release()` returned, to wake."""
        out = self._woken
        self._woken = []
        return out

    def _watch_limit(self, now: float) -> None:
        """Maintenance, while the adaptive limit holds lending back.

        Borrows on loan for `SLOW_BORROW` stop counting against the limit:
        one more connection is lent for each. And a caller the limit holds
        back that has waited `STALL_AFTER` seconds while the pool had room
        (idle connections, or room to open some) lifts the limit.
        """
        adaptive = self.adaptive
        assert adaptive is not None
        limit = adaptive.limit
        if limit >= self.max_size:
            self._slow = 0
            return
        self._slow = self._slow_borrows(now - SLOW_BORROW)
        cap = min(self.max_size, limit + self._slow)
        if cap != self.cap:
            raised = cap > self.cap
            self.cap = cap
            if raised:
                self._serve_more(now)
        if not self.n_waiting or self.cap >= self.max_size:
            return
        if self.committed >= self.max_size:  # held back by reservations
            return
        if not self.idle and self.size >= self.max_size:
            return
        since = [
            w.since
            for lane in self.lanes.values()
            # Held back by the limit, not by the lane's own.
            if lane.n_waiting and lane.in_use < lane.limit and not self.can_take(lane)
            for w in itertools.islice(
                (w for w in lane.waiters if w.state == WAITING), 1
            )
        ]
        if not since or now - min(since) < STALL_AFTER:
            return
        adaptive.stalled(now)
        self.cap = adaptive.limit
        self._serve_more(now)

    def _slow_borrows(self, lent_before: float) -> int:
        """Borrows the limit counts that were lent before `lent_before`:
        in each lane, those past its reservation (which the limit doesn't
        count), at most."""
        slow: dict[Lane, int] = {}
        for entry in self.entries:
            if entry.state == BUSY and entry.held_since < lent_before:
                lane = entry.lane
                assert lane is not None
                slow[lane] = slow.get(lane, 0) + 1
        return sum(
            min(n, lane.in_use - lane.reserved)
            for lane, n in slow.items()
            if lane.in_use > lane.reserved
        )

    def _unlease(self, entry: Entry) -> None:
        lane = entry.lane
        assert lane is not None and entry.state == BUSY, entry
        lane.in_use -= 1
        if lane.in_use >= lane.reserved:
            self.committed -= 1
        self.busy -= 1
        entry.lane = None
        entry.holder = None

    # -- opening and closing ------------------------------------------------

    def wanted_connects(self, now: float) -> int:
        """How many new connections to start opening now (and count them)."""
        if self.closed or now < self.next_connect_at:
            return 0
        size = self.size
        room = self.max_size - size
        if room <= 0:
            return 0
        want = self.min_size - size
        if self.n_waiting:
            # Callers that a new connection could serve, minus what is coming.
            servable = sum(
                min(lane.n_waiting, lane.limit - lane.in_use)
                for lane in self.lanes.values()
                if lane.n_waiting and self.can_take(lane)
            )
            want = max(want, servable - len(self.idle) - self.opening)
        limit = 1 if self.down else MAX_CONCURRENT_CONNECTS
        n = max(0, min(want, room, limit - self.opening))
        self.opening += n
        return n

    def new_entry(self, conn: Any, pid: int, now: float) -> Entry:
        """Make the entry for a freshly opened connection (not yet added)."""
        lifetime = self.max_lifetime
        expires = (
            now + lifetime * (1.0 - 0.05 * self._rng.random()) if lifetime else math.inf
        )
        return Entry(conn, pid, now, expires)

    def connect_succeeded(self, entry: Entry, now: float) -> Waiter | None:
        """A connection opened: it serves a waiter or becomes idle."""
        self.opening -= 1
        self.opened_total += 1
        self._failures = 0
        if not self._invalid_streak:
            self.next_connect_at = 0.0
        self.down = False
        self.entries.add(entry)
        if self.closed or self.size > self.max_size:
            self._discard(entry, "pool closed" if self.closed else "pool resized")
            return None
        return self._serve(entry, now)

    def connect_failed(self, error: str, now: float, unreachable: bool) -> None:
        """A connection attempt failed: back off; maybe mark the server down."""
        self.opening -= 1
        self.connect_errors_total += 1
        self.last_error = error
        self.last_error_at = now
        self._failures += 1
        self._back_off(now, self._failures)
        if unreachable:
            self.down = True

    def _back_off(self, now: float, failures: int) -> None:
        delay = min(BACKOFF_CAP, BACKOFF_INITIAL * BACKOFF_FACTOR ** (failures - 1))
        delay *= 1.0 + BACKOFF_JITTER * (2.0 * self._rng.random() - 1.0)
        self.next_connect_at = max(self.next_connect_at, now + delay)

    def lost(self, now: float) -> None:
        """A connection turned out dead: every idle one older is suspect."""
        self.lost_total += 1
        self.suspect_before = now

    def validation_failed(self, now: float, error: str = "") -> None:
        """The validation query failed on a connection that seemed alive.

        Replacing it at once could spin (a query that always fails would open
        and close connections as fast as the server allows): new connections
        back off as after a failed connect, without the server being taken
        for down, until a validation passes (`validation_passed`).
        """
        self.validation_failures_total += 1
        self._invalid_streak += 1
        self.last_validation_error = error
        self.lost(now)
        self._back_off(now, self._invalid_streak)

    def validation_passed(self) -> None:
        self._invalid_streak = 0

    def _discard(self, entry: Entry, reason: str) -> None:
        if entry.state == CHECKING:
            self.checking -= 1
        entry.state = CLOSED
        self.entries.discard(entry)
        self.closed_total += 1
        if reason in ("idle_timeout", "max_lifetime", "validation"):
            self.evictions_total += 1
        self._to_close.append((entry, reason))

    def pop_to_close(self) -> list[tuple[Entry, str]]:
        """Connections the shell must close, with why; the list is emptied."""
        out = self._to_close
        self._to_close = []
        return out

    def discard(self, entry: Entry, reason: str, now: float) -> Waiter | None:
        """Drop a borrowed or idle connection that must not be used again.

        Return a waiter served thanks to the room this made, for the shell
        to wake.
        """
        if entry.state == CLOSED:
            return None
        was_busy = entry.state == BUSY
        if was_busy:
            self._unlease(entry)
        elif entry.state == IDLE:
            self.idle.remove(entry)
        self._discard(entry, reason)
        return self._serve_from_idle(now) if was_busy else None

    # -- checks -------------------------------------------------------------

    def check_done(
        self, entry: Entry, now: float, ok: bool, alive: bool = True
    ) -> Waiter | None:
        """The evictor finished validating an idle connection.

        `alive` False: it failed the liveness test, before any query.
        """
        if entry.state != CHECKING:
            return None
        if not ok:
            if alive:
                self.validation_failed(now)
            else:
                self.validation_failures_total += 1
                self.lost(now)
            self._discard(entry, "validation")
            return None
        self.validation_passed()
        self.checking -= 1
        entry.last_ok = entry.last_checked = now
        if self.closed:
            self._discard(entry, "pool closed")
            return None
        if self.n_waiting:
            return self._serve(entry, now)
        # Back under the ones in use: being checked is no use, and the stack's
        # order is what lets idle connections reach idle_timeout.
        entry.state = IDLE
        self.idle.insert(0, entry)
        return None

    # -- maintenance --------------------------------------------------------

    def maintain(self, now: float) -> Actions:
        """One maintenance step: shrink, expire, pick idle checks, report leaks."""
        act = Actions()
        if self.closed:
            return act
        if self.adaptive is not None:  # first: the checks below take idle ones
            self._watch_limit(now)
            act.served = self.pop_woken()
        idle = self.idle
        # Oldest-used first: the bottom of the stack.
        i = 0
        while i < len(idle):
            entry = idle[i]
            if entry.expires_at <= now:
                del idle[i]
                self._discard(entry, "max_lifetime")
            elif (
                now - entry.last_used > self.idle_timeout and self.size > self.min_size
            ):
                del idle[i]
                self._discard(entry, "idle_timeout")
            else:
                i += 1

        if self.test_while_idle and now >= self.next_eviction_at:
            self.next_eviction_at = now + self.eviction_interval
            for entry in sorted(idle, key=_by_last_checked)[
                : self.tests_per_eviction_run
            ]:
                idle.remove(entry)
                entry.state = CHECKING
                self.checking += 1
                act.check.append(entry)

        if self.suspect_before > -math.inf:
            # After a failure, check every idle connection older than it.
            for entry in [e for e in idle if e.last_ok <= self.suspect_before]:
                idle.remove(entry)
                entry.state = CHECKING
                self.checking += 1
                act.check.append(entry)

        if self.leak_threshold:
            for entry in self.entries:
                if (
                    entry.state == BUSY
                    and not entry.leak_reported
                    and now - entry.held_since >= self.leak_threshold
                ):
                    entry.leak_reported = True
                    self.leaks_total += 1
                    act.leaks.append(entry)

        act.close = self.pop_to_close()
        act.connects = self.wanted_connects(now)
        return act

    def held(self, now: float) -> list[Entry]:
        """Borrowed connections, longest held first."""
        busy = [e for e in self.entries if e.state == BUSY]
        busy.sort(key=_by_held_since)
        return busy

    # -- closing and resizing -----------------------------------------------

    def close(self) -> list[Waiter]:
        """Refuse new work; return the waiters to fail; mark idle ones to close."""
        self.closed = True
        waiters: list[Waiter] = []
        for lane in self.lanes.values():
            for waiter in lane.waiters:
                if waiter.state == WAITING:
                    waiter.state = GONE
                    waiters.append(waiter)
            lane.waiters.clear()
            lane.n_waiting = 0
        self.n_waiting = 0
        while self.idle:
            self._discard(self.idle.pop(), "pool closed")
        return waiters

    def resize(self, min_size: int, max_size: int, now: float) -> list[Waiter]:
        """Change the sizes; lanes must still fit (checked by the caller).

        Return the waiters served from idle connections thanks to the change.
        """
        self.min_size = min_size
        self.max_size = max_size
        self.cap = max_size
        if self.adaptive is not None:
            reserved = sum(lane.reserved for lane in self.lanes.values())
            self.adaptive.resize(reserved + 1, max_size, now)
        if self._default_added:
            self.default_lane.limit = max_size
        for lane in self.lanes.values():
            lane.limit = min(lane.limit, max_size)
        while self.idle and self.size > max_size:
            self._discard(self.idle.pop(0), "pool resized")
        served = []
        while waiter := self._serve_from_idle(now):
            served.append(waiter)
        return served

    def wait_percentile(self, q: float) -> float:
        """The `q` quantile (0..1) of acquire waits, counting unqueued borrows as 0."""
        total = self.borrowed_total
        if not total:
            return 0.0
        rank = q * total
        zeros = total - self.waited_total
        if rank <= zeros:
            return 0.0
        seen = zeros
        for bound, count in zip(WAIT_BUCKETS, self.wait_counts, strict=True):
            seen += count
            if seen >= rank:
                return min(bound, self.wait_max)
        return self.wait_max


def _by_last_checked(entry: Entry) -> float:
    return entry.last_checked


def _by_held_since(entry: Entry) -> float:
    return entry.held_since
