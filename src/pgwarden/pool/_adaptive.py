"""Adaptive concurrency: how many connections a pool lends at once while
callers queue for them (`adaptive_concurrency`, off by default).

Python threads pay for each other. A borrower runs Python between its
queries, and the more borrowers run at once, the more GIL hand-offs each
query costs: on 2 cores, 64 threads doing `SELECT 1` made about 2,700
queries/s over 16 connections and 8,100 over 1 (bench/). Where the knee
lies depends on what borrowers do: ones that wait 2 ms on the server lose
throughput when held back. So the pool finds it by measuring.

Only while callers queue: each borrow that ends then counts, and windows of
at least `WINDOW_SECONDS` give throughputs (borrows ended per second). A
probe tries half as many connections (then, if that lost throughput, twice
as many), alternating windows at the trial limit and at the current one
(`PAIRS` of each, so that drift hits both alike). A step down is kept if
throughput holds (`DOWN_KEEP`), a step up if it rises (`UP_KEEP`); a kept
step is followed by another, otherwise the limit holds for `HOLD` windows,
twice as long after each probe that changed nothing (up to `HOLD_MAX`).
Probes' short windows favour the lower limit (what the higher one left running
still counts for a while), so steps down are then confirmed by holding: the
lower limit, then the one they started from (`CONFIRM_HOLD` windows each,
`CONFIRM_SKIP` not counted), and the lower one stays only if it was as fast
(`CONFIRM`). Without a queue nothing is held back. A busy spell starts where
the last one left off; measuring starts over after `LULL` seconds without a
queue.

A state machine with an injected clock: the pool's core calls it under its
lock, on the give-back of a borrow that has callers waiting behind it.
"""

from __future__ import annotations

import math

# A measurement window: at least this long, and this many borrows.
WINDOW_SECONDS = 0.05
WINDOW_BORROWS = 16
# Windows at the trial limit in a probe, and as many at the current one.
PAIRS = 2
# A step down is kept if throughput stays at or above this multiple of the
# current limit's, a step up if it reaches this one (steps up must pay).
DOWN_KEEP = 1.0
UP_KEEP = 1.05
# Steps down, once held, must reach this share of the throughput of the limit
# they started from, held again (a step down must prove itself); after each
# refuted one in a row, the hold that follows doubles, up to
# HOLD_MAX << REFUTED_BACKOFF windows.
CONFIRM = 1.0
REFUTED_BACKOFF = 4
# Windows of each of those two holds, and how many of their first ones don't
# count: a change of limit can take a few hundred milliseconds to show.
CONFIRM_HOLD = 32
CONFIRM_SKIP = 8
# Windows held at a limit between probes: at first, and at most.
HOLD = 8
HOLD_MAX = 64
# Seconds without a queue that end a busy spell: a window spanning one would
# count the lull as slowness.
LULL = 0.5

DOWN = -1
UP = 1


class AdaptiveLimit:
    """How many connections to lend at once, between `floor` and `ceiling`."""

    __slots__ = (
        "_anchor",
        "_base",
        "_count",
        "_direction",
        "_held",
        "_hold",
        "_last",
        "_phase",
        "_recheck",
        "_refuted",
        "_settling",
        "_started",
        "_steady",
        "_sums",
        "_trial",
        "ceiling",
        "floor",
        "limit",
        "probes_total",
    )

    _base: int  # the limit, or while a probe runs the one it is tried against
    _trial: int
    _direction: int
    _phase: int  # -1 while holding, else the probe's window number
    _held: int
    _hold: int
    _settling: int
    _count: int
    _started: float
    _sums: list[float]
    _steady: list[float]  # borrows and seconds of the windows held so far
    _anchor: int | None  # the limit before the last probes, to confirm against
    _recheck: tuple[int, float] | None  # a lower limit and its held rate
    _refuted: int  # steps down taken back in a row

    def __init__(self, floor: int, ceiling: int) -> None:
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self.limit = ceiling
        self.probes_total = 0  # probes run, whatever they decided
        self._last = -math.inf  # when the last borrow ended with a queue
        self._restart(-math.inf)

    def __repr__(self) -> str:
        probing = f", probing {self._trial}" if self._phase >= 0 else ""
        return f"<AdaptiveLimit {self.limit} in {self.floor}..{self.ceiling}{probing}>"

    @property
    def kept(self) -> int:
        """The limit decided on: not one a probe tries, nor a step down
        not confirmed yet."""
        anchor = self._anchor
        if anchor is not None and anchor > self.limit:
            return anchor
        return self._base if self._phase >= 0 else self.limit

    def resize(self, floor: int, ceiling: int) -> None:
        """New bounds (the pool was resized): start over at the ceiling."""
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self.limit = ceiling
        self._restart(self._last)

    def ended(self, now: float) -> bool:
        """A borrow ended while callers queue; True if `limit` changed."""
        if now - self._last > LULL:  # a new busy spell: a new window
            self._last = now
            self._count = self._settling = 0
            self._started = now
            if self._phase < 0:
                return False
            self.limit = self._base  # the probe is void: hold, then try again
            self._settle(moved=True)
            return True
        self._last = now
        if self._settling:  # the borrows lent under the previous limit
            self._settling -= 1
            self._started = now
            return False
        self._count += 1
        elapsed = now - self._started
        if self._count < WINDOW_BORROWS or elapsed < WINDOW_SECONDS:
            return False
        old = self.limit
        self._window_done(self._count, elapsed)
        self._count = 0
        self._started = now
        if self.limit != old:
            self._settling = max(old, self.limit)
            return True
        return False

    def stalled(self) -> None:
        """The limit held a caller back long while the pool had room (a
        borrower waiting on another one's borrow, say), or a caller it must
        not hold back found no idle connection: lend them all, and probe
        much later."""
        self.limit = self.ceiling
        self._anchor = self._recheck = None
        self._hold = HOLD_MAX
        self._settle(moved=True)

    def _restart(self, now: float) -> None:
        self._settling = 0  # borrows to skip before a window starts
        self._count = 0
        self._started = now
        self._phase = -1
        self._held = 0
        self._hold = 2  # a first measure to confirm steps down against
        self._base = self._trial = self.limit
        self._direction = DOWN
        self._sums = [0.0, 0.0, 0.0, 0.0]  # trial: borrows, seconds; base: same
        self._steady = [0.0, 0.0]
        self._anchor = None
        self._recheck = None
        self._refuted = 0

    def _window_done(self, borrows: int, seconds: float) -> None:
        phase = self._phase
        if phase < 0:  # holding
            self._held += 1
            steady = self._steady
            confirming = self._recheck is not None or (
                self._anchor is not None and self._anchor > self.limit
            )
            # The first windows still show the last change.
            if self._held > (CONFIRM_SKIP if confirming else 1):
                steady[0] += borrows
                steady[1] += seconds
            if self._held >= (CONFIRM_HOLD if confirming else self._hold):
                rate = steady[0] / steady[1] if steady[1] else 0.0
                if self._confirmed(rate):
                    self._anchor = self.limit
                    self._probe_down_or_up()
            return
        sums = self._sums
        i = 0 if phase % 2 == 0 else 2  # windows alternate: trial, base, ...
        sums[i] += borrows
        sums[i + 1] += seconds
        phase += 1
        if phase < 2 * PAIRS:
            self._phase = phase
            self.limit = self._trial if phase % 2 == 0 else self._base
            return
        gain = (sums[0] / sums[1]) / (sums[2] / sums[3])
        if self._direction == DOWN:
            if gain >= DOWN_KEEP:
                self._keep_going(DOWN)
            else:
                self.limit = self._base
                if not self._probe(UP):
                    self._settle(moved=False)
        elif gain >= UP_KEEP:
            self._keep_going(UP)
        else:
            self.limit = self._base
            self._settle(moved=False)

    def _confirmed(self, rate: float) -> bool:
        """After a hold: may probing go on? Not until steps down are confirmed.

        A probe's short windows can be misled: after a change, what the
        previous limit left running still counts for a while. So once held
        at a limit that probes brought down, the limit they started from is
        held again, and the lower one kept only if its held throughput was
        at least `CONFIRM` of that one's. If not, the pool stays at the
        higher limit and waits longer before trying again.
        """
        recheck = self._recheck
        if recheck is not None:  # held again at the limit the steps left
            self._recheck = None
            lower, lower_rate = recheck
            if lower_rate >= rate * CONFIRM:
                self.limit = lower
                self._refuted = 0
                self._hold = HOLD_MAX
            else:
                self._hold = HOLD_MAX << min(self._refuted, REFUTED_BACKOFF)
                self._refuted += 1
            self._settle(moved=True)
            return False
        anchor = self._anchor
        if anchor is not None and anchor > self.limit:
            self._recheck = (self.limit, rate)
            self.limit = anchor
            self._anchor = None
            self._settle(moved=True)
            return False
        return True

    def _probe_down_or_up(self) -> None:
        if not (self._probe(DOWN) or self._probe(UP)):
            self._settle(moved=False)

    def _keep_going(self, direction: int) -> None:
        """The trial limit won: make it the limit and try one more step."""
        self.limit = self._base = self._trial
        self._hold = HOLD  # the load moved: probe again soon after
        if not self._probe(direction):
            self._settle(moved=True)

    def _probe(self, direction: int) -> bool:
        """Start trying one step in `direction`; False if at the bound."""
        limit = self._base = self.limit
        if direction == DOWN:
            trial = max(self.floor, (limit + 1) // 2)
        else:
            trial = min(self.ceiling, limit * 2)
        if trial == limit:
            return False
        self.probes_total += 1
        self._direction = direction
        self._trial = self.limit = trial
        self._phase = 0
        self._sums = [0.0, 0.0, 0.0, 0.0]
        return True

    def _settle(self, moved: bool) -> None:
        """Hold the limit; after a probe that changed nothing, for longer."""
        if not moved:
            self._hold = min(self._hold * 2, HOLD_MAX)
        self._phase = -1
        self._held = 0
        self._steady = [0.0, 0.0]
