"""Adaptive concurrency: how many connections a pool lends at once while
callers queue for them (`adaptive_concurrency`).

Python threads pay for each other. A borrower runs Python between its
queries, and while others run too, each query costs GIL hand-offs and
thread switches: on 2 cores, in one run, 64 threads doing `SELECT 1` made
about 7,300 queries/s over 1 connection, and 4,200 to 5,100 over anything
from 2 to 16. One borrower at a time runs alone. Borrowers that wait on the
server lose throughput when held back, so the pool measures.

Two levels only: every connection (`ceiling`), or as few as the lanes'
reservations allow (`floor`, one without them). Limits in between were
tried: where throughput is flat across them, noise walked the limit down
step by step, and short transactions lost up to 40 % at 2 to 4 connections.

Only while callers queue: each borrow that ends then counts, and windows of
at least `WINDOW_SECONDS` give throughputs (borrows ended per second). The
limit holds for `HOLD` windows (`FIRST_HOLD` at first), then a probe holds
the other level for `PROBE_SKIP` + `PROBE_WINDOWS` windows. A change
of limit takes up to 150 ms to show in throughput here (with 64 threads,
going from 4 connections to 1 first looked 1.25x as fast, then 2x), so the
first `PROBE_SKIP` windows don't count. The floor is kept if it made
`DOWN_KEEP` times the throughput of the hold before, and then the ceiling
again in a probe at once made less than it did; the ceiling is kept if it
made as much as the floor (`UP_KEEP`). After each probe that changed
nothing, the next hold at the ceiling is `SETTLE_GROWTH` times as long (up
to `SETTLE_MAX`); at the floor it stays `HOLD_MAX`, so that a load that
changed finds out. Probes cost little:

- none to the floor when it cannot win: each of its connections makes at
  most one borrow per shortest borrow seen (held, from lend to give-back);
  if that bound is under `HOPELESS` of the current throughput (borrowers
  waiting 2 ms on the server, say), the probe is skipped;
- one that starts far behind (`ABORT`) ends after its first window (for a
  probe of the floor whose first window is the first after a lull,
  `RESUMED` decides instead, see below).

One connection at a time makes every queued caller wait for the longest
borrow, so a borrow lent at the floor that holds its connection over
`LONG_HELD` ends a probe, refutes a step down, or leaves a kept floor.

A probe can be misled by drift, so a step down is checked at once against
the ceiling again (a floor that only beat a slow moment costs no more than
its probe), then confirmed by holding longer: the floor, then the ceiling
again (`CONFIRM_HOLD` windows each, `CONFIRM_SKIP` not counted); the floor
stays only if it was `CONFIRM` times as fast. Without a queue nothing is
held back. `LULL` seconds without a queue are cut out: holds, probes and
confirmations go on where they were, so that bursts of load shorter than
those get them too. The first window after a lull moves them on, but its
borrows don't count (they show the load coming back); below the ceiling, it
must make `RESUMED` times the ceiling's last throughput, or the floor is
given up: the load changed meanwhile. So must the floor's first window after
the ceiling was tried back or held again, which a lull may have split.

A state machine with an injected clock: the pool's core calls it under its
lock, on the give-back of a borrow that has callers waiting behind it.
"""

from __future__ import annotations

import math

# A measurement window: at least this long, and this many borrows.
WINDOW_SECONDS = 0.05
WINDOW_BORROWS = 16
# Windows of a probe: not counted, then counted.
PROBE_SKIP = 3
PROBE_WINDOWS = 4
# The floor is kept if its throughput reaches this multiple of the
# ceiling's, the ceiling if it reaches this multiple of the floor's.
DOWN_KEEP = 1.25
UP_KEEP = 1.0
# No probe to the floor if its connections, each making one borrow per
# shortest borrow seen, would make less than this share of the current
# throughput. Borrows seen at the ceiling are longer than they would be
# alone (they wait for the GIL too): 0.5 skipped probes that would have won.
HOPELESS = 0.25
# One connection at a time makes every queued caller wait for the longest
# borrow: the floor is given up (a probe ends, a step down is refuted, a
# kept floor is left) once a borrow lent there held its connection longer
# than this (seconds). SELECT 1 from 64 threads held at most 4 ms.
LONG_HELD = 0.02
# A probe whose first window makes less than this share of the throughput
# held before it ends there.
ABORT = 0.6
# Below the ceiling after a lull, the floor is given up if the first window
# makes less than this share of the ceiling's last throughput:
# borrowers that now wait on the server make a small fraction of it there,
# while GIL-bound ones coming back made half of it at worst.
RESUMED = 0.3
# The floor, once held, must make this multiple of the ceiling's throughput,
# held again. After each refuted step down in a row, the hold that follows
# doubles, up to HOLD_MAX << BACKOFF windows.
CONFIRM = 1.1
BACKOFF = 4
# Windows of each of those two holds, and how many of their first ones don't
# count (a change of limit takes up to 150 ms to show).
CONFIRM_HOLD = 32
CONFIRM_SKIP = 8
# Windows held between probes: at first (FIRST_HOLD: a load that gains at
# the floor gets there soon) and after a kept step (HOLD); at least HOLD_MAX
# after a confirmation, a lift() or a stall; after probes that changed
# nothing, at the ceiling SETTLE_GROWTH times as long each time, from HOLD up
# to SETTLE_MAX (unless a backoff made it longer already), at the floor
# HOLD_MAX.
FIRST_HOLD = 4
HOLD = 8
HOLD_MAX = 64
SETTLE_GROWTH = 4
SETTLE_MAX = HOLD_MAX << 3
# After each stall (see stalled()), ever, the hold that follows doubles, up
# to HOLD_MAX << STALL_BACKOFF windows (about an hour): borrowers that wait
# on each other's borrows don't suit a limit.
STALL_BACKOFF = 10
# Seconds without a queue that end a busy spell: a window spanning one would
# count the lull as slowness.
LULL = 0.5


class AdaptiveLimit:
    """How many connections to lend at once: `floor` or `ceiling`."""

    __slots__ = (
        "_base",
        "_ceiling_rate",
        "_changed_at",
        "_check",
        "_confirming",
        "_count",
        "_held",
        "_hold",
        "_last",
        "_min_held",
        "_pending",
        "_phase",
        "_rate",
        "_recheck",
        "_refuted",
        "_skip",
        "_stalls",
        "_started",
        "_steady",
        "_sums",
        "_trial",
        "_window_max",
        "ceiling",
        "floor",
        "limit",
        "probes_total",
    )

    _base: int  # the limit, or while a probe runs the one it is tried against
    _trial: int
    _phase: int  # -1 while holding, else the probe's window number
    _sums: list[float]  # borrows and seconds of the probe's counted windows
    _held: int  # windows held so far
    _hold: int  # windows to hold
    _changed_at: float  # when the limit last changed
    _count: int
    _started: float
    _steady: list[float]  # borrows and seconds of the windows held so far
    _min_held: float  # the shortest borrow seen in this hold (seconds)
    _window_max: float  # the longest in the current window
    _rate: float  # the throughput of the last hold
    _ceiling_rate: float  # the last one measured at the ceiling
    _confirming: bool  # holding to confirm a step down (see _confirm)
    # None while held at the floor, then the floor's throughput while the
    # ceiling is held again.
    _recheck: float | None
    _refuted: int  # steps down taken back in a row
    _skip: bool  # the window under way is the first after a lull
    _check: bool  # at the floor after a lull: see _new_spell()
    _pending: list[float]  # borrows and seconds of spells too short to check
    _stalls: int

    def __init__(self, floor: int, ceiling: int) -> None:
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self.limit = ceiling
        self.probes_total = 0  # probes run, whatever they decided
        self._last = -math.inf  # when the last borrow ended with a queue
        self._refuted = self._stalls = 0
        self._restart(-math.inf)

    def __repr__(self) -> str:
        probing = f", probing {self._trial}" if self._phase >= 0 else ""
        return f"<AdaptiveLimit {self.limit} in {self.floor}..{self.ceiling}{probing}>"

    @property
    def kept(self) -> int:
        """The limit decided on: not one a probe tries, nor a step down
        not confirmed yet."""
        if self._confirming:
            return self.ceiling
        return self._base if self._phase >= 0 else self.limit

    def resize(self, floor: int, ceiling: int, now: float) -> None:
        """New bounds (the pool was resized): start over at the ceiling."""
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self.limit = ceiling
        self._refuted = self._stalls = 0
        self._restart(now)

    def ended(self, now: float, held: float, counted: bool = True) -> bool:
        """A borrow that held its connection `held` seconds ended while
        callers queue; True if `limit` changed. `counted`: whether the limit
        counted it (a lane's reservation it never holds back, nor waits on)."""
        if now - self._last > LULL:  # a new busy spell
            last, self._last = self._last, now
            return self._new_spell(now, last)
        self._last = now
        if now - held < self._changed_at:  # lent before the last change
            self._new_window(now)
            return False
        if counted:
            if held < self._min_held:
                self._min_held = held
            if held > self._window_max:
                self._window_max = held
        self._count += 1
        elapsed = now - self._started
        if self._count < WINDOW_BORROWS or elapsed < WINDOW_SECONDS:
            return False
        old = self.limit
        self._window_done(self._count, elapsed, self._window_max)
        self._new_window(now)
        if self.limit != old:
            self._changed_at = now
            return True
        return False

    def _new_spell(self, now: float, last: float) -> bool:
        """A busy spell after a lull, which ended at `last`: the lull is cut
        out, and measuring goes on where it was (a hold, a probe, a
        confirmation), so that bursts of load shorter than those get them too.

        The window under way when the lull came is dropped. The first one
        after it moves measuring on, but its borrows don't count: they show
        the load coming back. The load may have changed meanwhile: below the
        ceiling, that window must make `RESUMED` times the ceiling's last
        throughput, or the floor is given up. Spells that end before that
        window does are added up, and judged once they make half a window's
        borrows. A borrow lent at the floor that held its connection over
        `LONG_HELD` gives it up in any window, the one the lull cut included.
        """
        old = self.limit
        if self.limit < self.ceiling and self._window_max > LONG_HELD:
            self._give_up_floor()  # lent at the floor, in the window the lull cut
        elif self._check and last > self._started:
            borrows = self._pending[0] + self._count
            seconds = self._pending[1] + last - self._started
            if borrows >= WINDOW_BORROWS // 2:
                self._checked(borrows, seconds)
            else:
                self._pending = [borrows, seconds]
        self._check = self.limit < self.ceiling
        self._skip = True
        self._new_window(now)
        # Lent with no queue, so without the limit: not a window's.
        self._changed_at = now
        return self.limit != old

    def _new_window(self, now: float) -> None:
        self._count = 0
        self._window_max = 0.0
        self._started = now

    def _checked(self, borrows: float, seconds: float) -> bool:
        """The check after a lull (see `_new_spell`), below the ceiling;
        True if it failed, and the floor was given up."""
        self._check = False
        self._pending = [0, 0.0]
        if borrows >= RESUMED * self._ceiling_rate * seconds:
            return False
        self._give_up_floor()
        return True

    def _give_up_floor(self) -> None:
        """Back to the ceiling: a probe of the floor ends, a hold there is
        refuted."""
        self._skip = False
        if self._phase >= 0 and self._trial < self._base:  # a probe of the floor
            self._end_probe(moved=False)
        else:
            self._refute()

    def lift(self, now: float) -> None:
        """A caller the limit must not hold back found no idle connection:
        lend them all (so that one is opened for it), and probe later."""
        self.limit = self.ceiling
        self._changed_at = now
        self._confirming = False
        self._recheck = None
        self._hold = max(self._hold, HOLD_MAX)
        self._settle(moved=True)

    def stalled(self, now: float) -> None:
        """The limit held a caller back long while the pool had room (a
        borrower waiting on another one's borrow, say): lend them all, and
        probe much later, the later the more often it happens."""
        self.lift(now)
        backoff = HOLD_MAX << min(self._stalls, STALL_BACKOFF)
        self._hold = max(self._hold, backoff)
        self._stalls += 1

    def _restart(self, now: float) -> None:
        self._changed_at = now  # borrows lent before don't count
        self._new_window(now)
        self._base = self._trial = self.limit
        self._sums = [0.0, 0.0]
        self._rate = self._ceiling_rate = 0.0
        self._skip = False
        self._confirming = False
        self._recheck = None
        self._hold = FIRST_HOLD  # a first measure to compare probes against
        self._settle(moved=True)

    def _window_done(self, borrows: int, seconds: float, longest: float) -> None:
        if self._check and self._checked(borrows, seconds):
            return
        if self._skip:  # the first window after a lull: see _new_spell()
            self._skip = False
            borrows, seconds = 0, 0.0  # its longest borrow still counts
        phase = self._phase
        if phase < 0:  # holding
            self._held += 1
            steady = self._steady
            confirming = self._confirming
            if self.limit < self.ceiling and longest > LONG_HELD:
                self._give_up_floor()  # it holds the queue up behind it
                return
            # The first windows still show the last change.
            if self._held > (CONFIRM_SKIP if confirming else 1):
                steady[0] += borrows
                steady[1] += seconds
            if self._held >= (CONFIRM_HOLD if confirming else self._hold):
                rate = steady[0] / steady[1] if steady[1] else 0.0
                if confirming:
                    self._confirm(rate)
                elif not rate:  # nothing measured (bursts of one window)
                    self._settle(moved=True)
                else:
                    self._rate = rate
                    if self.limit == self.ceiling:
                        self._ceiling_rate = rate
                    self._probe_other()
            return
        self._phase = phase + 1
        if (self._trial < self._base and longest > LONG_HELD) or (
            phase == 0 and borrows < ABORT * self._rate * seconds
        ):
            # The floor would hold the queue up, or far behind at once (a
            # level that wins takes a while to show how much, but it does
            # not start out that far behind): not worth the rest.
            self._end_probe(moved=False)
            return
        if phase < PROBE_SKIP:
            return
        sums = self._sums
        sums[0] += borrows
        sums[1] += seconds
        if phase + 1 < PROBE_SKIP + PROBE_WINDOWS:
            return
        if not sums[1]:  # every counted window was a first after a lull
            self._end_probe(moved=True)
            return
        rate = sums[0] / sums[1]
        if self._trial == self.ceiling and rate:
            self._ceiling_rate = rate
        won = rate >= (DOWN_KEEP if self._trial < self._base else UP_KEEP) * self._rate
        if self._confirming and won:  # the ceiling, tried back at once
            self._refute()
        elif won:
            self.limit = self._trial
            if self.limit < self.ceiling:  # a step down: try back at once
                self._confirming = True
                self._rate = rate
                self._probe_other()
            else:
                self._hold = HOLD  # the load moved: probe again soon after
                self._settle(moved=True)
        else:
            self._end_probe(moved=False)

    def _end_probe(self, moved: bool) -> None:
        """Back to the limit the probe was tried against. After a step down,
        that is the floor, held to confirm it: its first window is checked
        as the first after a lull is (see `_new_spell`), for a lull while
        the ceiling was tried back would hide a load that changed."""
        self.limit = self._base
        self._settle(moved)
        if self._confirming:
            self._check = True

    def _confirm(self, rate: float) -> None:
        """A hold while confirming a step down has ended.

        A probe compares its windows with the hold before it, so drift can
        mislead it. So once held at the floor, the ceiling is held again,
        and the floor kept only if its held throughput was `CONFIRM` times
        that one's. If not, the pool stays at the ceiling and waits longer
        before trying again.
        """
        recheck = self._recheck
        if recheck is None:  # held at the floor: now at the ceiling again
            self._recheck = rate
            self.limit = self.ceiling
        else:
            if rate:
                self._ceiling_rate = rate
            self._confirming = False
            self._recheck = None
            # Not faster, or either hold measured nothing (bursts too short).
            if recheck < rate * CONFIRM or not (recheck and rate):
                self._refute()
                return
            self.limit = self.floor
            self._refuted = 0
            self._hold = HOLD_MAX
        self._settle(moved=True)
        # The floor's first window is checked as after a lull: one while the
        # ceiling was held again would hide a load that changed.
        self._check = self.limit < self.ceiling

    def _refute(self) -> None:
        """Back to the ceiling from a step down: wait longer each time in a
        row before trying again."""
        self.limit = self.ceiling
        self._confirming = False
        self._recheck = None
        self._hold = HOLD_MAX << min(self._refuted, BACKOFF)
        self._refuted += 1
        self._settle(moved=True)

    def _probe_other(self) -> None:
        """Try the other level, unless that can't pay."""
        limit = self._base = self.limit
        trial = self.floor if limit == self.ceiling else self.ceiling
        if trial == limit:
            self._settle(moved=False)
            return
        if trial < limit and trial < HOPELESS * self._rate * self._min_held:
            self._settle(moved=True)  # skipping costs nothing: no backoff
            return
        self.probes_total += 1
        self._trial = self.limit = trial
        self._phase = 0
        self._sums = [0.0, 0.0]

    def _settle(self, moved: bool) -> None:
        """Hold the limit; after a probe that changed nothing, for longer."""
        if not moved and self.limit < self.ceiling:
            self._hold = HOLD_MAX  # (after a probe of the ceiling that lost)
        elif not moved:
            grown = min(max(self._hold, HOLD) * SETTLE_GROWTH, SETTLE_MAX)
            self._hold = max(self._hold, grown)  # not shorter than a backoff
        self._phase = -1
        self._check = False
        self._pending = [0, 0.0]
        self._held = 0
        self._steady = [0.0, 0.0]
        self._min_held = math.inf
