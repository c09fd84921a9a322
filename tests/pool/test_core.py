"""The pool's decision core on a fake clock, without a server.

These complement the tests against the real server: a Hypothesis state machine
drives random sequences of borrows, returns, connects, failures, timeouts and
maintenance steps, and checks after every step that the accounting holds.
"""

from __future__ import annotations

import math
import random
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pgwarden.config import LaneSpec
from pgwarden.pool import _core, _messages
from pgwarden.pool._core import BUSY, IDLE, Entry, Lane, PoolCore
from pgwarden.pool.stats import snapshot


class FakeWaiter:
    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.entry: Entry | None = None
        self.error: BaseException | None = None
        self.seq = 0
        self.since = 0.0
        self.deadline = 0.0
        self.state = _core.WAITING
        self.woken = False

    def accepts(self) -> bool:
        return True

    def wake(self) -> None:
        self.woken = True


def make_core(**kwargs: Any) -> PoolCore:
    settings: dict[str, Any] = {"min_size": 1, "max_size": 4, "rng": random.Random(0)}
    settings.update(kwargs)
    return PoolCore(**settings)


def open_one(core: PoolCore, now: float) -> Any:
    """Simulate a connect the core asked for; return the waiter it served."""
    assert core.opening > 0
    entry = core.new_entry(object(), 1000 + core.opened_total, now)
    return core.connect_succeeded(entry, now)


def test_reserved_lane_always_has_room() -> None:
    core = make_core(min_size=0, max_size=3, lanes=[LaneSpec("calls", 1, 1)])
    now = 0.0
    # Fill the pool from the default lane: it may use only 2 (3 minus 1 reserved).
    for _ in range(3):
        core.entries.add(e := core.new_entry(object(), 1, now))
        core.idle.append(e)
    default = core.default_lane
    taken = [core.try_acquire(default, now) for _ in range(3)]
    assert taken[2] is None and all(taken[:2])
    assert core.try_acquire(core.lanes["calls"], now) is not None


def test_lane_owed_its_reservation_is_served_first() -> None:
    core = make_core(min_size=0, max_size=4, lanes=[LaneSpec("calls", 2, 2)])
    older = FakeWaiter(core.default_lane)
    newer = FakeWaiter(core.lanes["calls"])
    core.enqueue(older, 0.0, deadline=10.0)  # type: ignore[arg-type]
    core.enqueue(newer, 1.0, deadline=10.0)  # type: ignore[arg-type]
    assert core.wanted_connects(1.0) == 2
    assert open_one(core, 1.5) is newer  # the reserved lane is owed one
    assert open_one(core, 1.6) is older


def test_max_waiting_never_locks_a_lane_out_of_its_reservation() -> None:
    core = make_core(min_size=0, max_size=4, max_waiting=3, lanes=[LaneSpec("a", 2, 2)])
    flood = core.default_lane  # limit 2 (4 minus a's 2)
    for _ in range(3):
        core.enqueue(FakeWaiter(flood), 0.0, deadline=10.0)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        core.enqueue(FakeWaiter(flood), 0.0, deadline=10.0)  # type: ignore[arg-type]
    a = core.lanes["a"]
    for _ in range(2):  # within a's reservation: admitted past max_waiting
        core.enqueue(FakeWaiter(a), 0.0, deadline=10.0)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):  # beyond it, a queues like everyone
        core.enqueue(FakeWaiter(a), 0.0, deadline=10.0)  # type: ignore[arg-type]
    assert core.overloaded_total == 2


def test_resize_keeps_a_configured_default_lane_limit() -> None:
    configured = make_core(
        min_size=0, max_size=4, lanes=[LaneSpec("default", 0, 2), LaneSpec("b", 1, 4)]
    )
    configured.resize(0, 8, 0.0)
    assert configured.default_lane.limit == 2
    added = make_core(min_size=0, max_size=4, lanes=[LaneSpec("b", 1, 4)])
    added.resize(0, 8, 0.0)
    assert added.default_lane.limit == 8


def test_a_timeout_says_when_reservations_leave_no_room() -> None:
    core = make_core(min_size=0, max_size=2, lanes=[LaneSpec("calls", 1, 1)])
    entry = core.new_entry(object(), 1, 0.0)
    core.entries.add(entry)
    core.idle.append(entry)
    assert core.try_acquire(core.default_lane, 0.0) is entry  # the shared one
    message = _messages.timeout_message(core, "p", core.default_lane, 1.0, 1.0)
    assert "no room is left outside the reservations of other lanes" in message
    assert "(calls 1 reserved)" in message


def test_expired_connection_is_not_handed_out() -> None:
    core = make_core(max_lifetime=10.0)
    entry = core.new_entry(object(), 1, 0.0)
    core.opening = 1
    core.connect_succeeded(entry, 0.0)
    assert core.try_acquire(core.default_lane, 10.0) is None
    assert core.pop_to_close() == [(entry, "max_lifetime")]
    assert core.evictions_total == 1


def _idle_core(n: int, now: float) -> tuple[PoolCore, list[Entry]]:
    core = make_core(min_size=0, max_size=n + 1)
    entries = []
    for pid in range(n):
        core.entries.add(e := core.new_entry(object(), pid, now))
        core.idle.append(e)
        entries.append(e)
    return core, entries


def test_a_busy_caller_cycles_over_rotation_connections() -> None:
    core, _ = _idle_core(5, 0.0)
    lane = core.default_lane
    used = []
    now = 0.0
    for _ in range(30):
        now += 0.001
        entry = core.try_acquire(lane, now)
        assert entry is not None
        used.append(entry.pid)
        core.release(entry, now, True)
    # Never the one just given back: a cycle over ROTATION connections.
    assert all(a != b for a, b in pairwise(used))
    assert len(set(used)) == _core.ROTATION
    # The connections deeper in the stack were left alone: they can idle out.
    assert {0, 1} <= {e.pid for e in core.idle[: -_core.ROTATION]}


def test_short_bursts_pay_no_extra_validation() -> None:
    window = _core.ALIVE_BYPASS_WINDOW
    core, _ = _idle_core(4, 0.0)
    lane = core.default_lane
    stale_picks = 0
    now = 0.0
    for _ in range(8):  # bursts of two borrows, further apart than the window
        now += window * 1.2
        for _ in range(2):
            now += 0.001
            entry = core.try_acquire(lane, now)
            assert entry is not None
            stale_picks += now - entry.last_ok > window  # would need a query
            entry.last_ok = now  # validated
            core.release(entry, now, True)
    assert stale_picks == 8  # one per burst, as a stack would


def test_checked_idle_connection_goes_under_the_others() -> None:
    core, _ = _idle_core(3, 0.0)
    core.tests_per_eviction_run = 1
    used = core.try_acquire(core.default_lane, 1.0)
    assert used is not None
    core.release(used, 1.0, True)
    act = core.maintain(10.0)
    [checked] = act.check
    core.check_done(checked, 10.0, ok=True)
    assert core.idle[0] is checked and core.idle[-1] is used
    # Being checked is not being used: idle_timeout still closes it.
    core.maintain(core.idle_timeout + 0.5)
    assert core.entries == {used}


def test_rotation_one_is_a_stack() -> None:
    core, entries = _idle_core(3, 0.0)
    core.rotation = 1
    for now in (0.001, 0.002, 0.003):
        assert core.try_acquire(core.default_lane, now) is entries[-1]
        core.release(entries[-1], now, True)


def test_a_slow_caller_gets_the_most_recent_connection() -> None:
    window = _core.ALIVE_BYPASS_WINDOW
    core, entries = _idle_core(3, 0.0)
    lane = core.default_lane
    now = window * 2  # all of them need a validation query: take the newest
    entry = core.try_acquire(lane, now)
    assert entry is entries[-1]
    core.release(entry, now, True)
    # Borrows too far apart for a cycle to stay within the window: the newest,
    # the only one needing no query, is taken again and again.
    for _ in range(3):
        now += window * 0.9
        assert core.try_acquire(lane, now) is entries[-1]
        core.release(entries[-1], now, True)


def test_lifetime_jitter_shortens_by_at_most_five_percent() -> None:
    core = make_core(max_lifetime=100.0)
    ends = [core.new_entry(object(), 1, 0.0).expires_at for _ in range(200)]
    assert all(95.0 <= t <= 100.0 for t in ends)
    assert len(set(ends)) > 100


def test_backoff_grows_and_is_capped() -> None:
    core = make_core(min_size=1)
    delays = []
    now = 0.0
    for _ in range(12):
        assert core.wanted_connects(now) == 1
        core.connect_failed("refused", now, unreachable=True)
        delays.append(core.next_connect_at - now)
        assert core.wanted_connects(now) == 0  # backing off
        now = core.next_connect_at
    assert delays[0] < 0.2 and delays[1] > delays[0]
    assert max(delays) <= _core.BACKOFF_CAP * (1 + _core.BACKOFF_JITTER)
    assert core.down


def test_fast_fail_only_while_down() -> None:
    core = make_core(min_size=0, max_size=1)
    waiter = FakeWaiter(core.default_lane)
    core.enqueue(waiter, 0.0, deadline=10.0)  # type: ignore[arg-type]
    assert not core.expire_waiter(waiter, _core.FAST_FAIL_WAIT + 0.1)  # type: ignore[arg-type]
    core.opening = 1
    core.connect_failed("refused", 1.5, unreachable=True)
    assert core.expire_waiter(waiter, 1.6)  # type: ignore[arg-type]
    assert waiter.state == _core.GONE and core.n_waiting == 0


def test_full_server_is_not_down() -> None:
    core = make_core()
    core.opening = 1
    core.connect_failed("too many clients", 0.0, unreachable=False)
    assert not core.down and core.last_error == "too many clients"


def test_wait_percentiles() -> None:
    core = make_core()
    core.borrowed_total = 100
    for _ in range(10):
        core.record_wait(0.3)
    assert core.wait_percentile(0.5) == 0.0
    assert core.wait_percentile(0.95) == pytest.approx(0.3)
    assert core.wait_max == 0.3
    assert core.wait_sum == pytest.approx(3.0)
    stats = snapshot(core, "p", 0.0)
    (_, zeros), *_ = stats.wait_histogram
    assert zeros == 90  # borrows served at once fall in the first bucket
    assert stats.wait_histogram[-1][1] == 100
    assert stats.wait_sum_seconds == pytest.approx(3.0)


class ScriptedLimit:
    """Stands in for `AdaptiveLimit`: moves to `next` at the next `ended()`."""

    def __init__(self, floor: int, ceiling: int) -> None:
        self.floor, self.ceiling, self.limit = floor, ceiling, ceiling
        self.next: int | None = None
        self.helds: list[float] = []  # what each ended() was told
        self.counted: list[bool] = []

    def ended(self, now: float, held: float, counted: bool = True) -> bool:
        self.helds.append(held)
        self.counted.append(counted)
        if self.next is None:
            return False
        self.limit, self.next = self.next, None
        return True

    def stalled(self, now: float) -> None:
        self.limit = self.ceiling

    def lift(self, now: float) -> None:
        self.limit = self.ceiling

    def resize(self, floor: int, ceiling: int, now: float) -> None:
        self.floor, self.ceiling, self.limit = min(floor, ceiling), ceiling, ceiling


@pytest.fixture
def no_slow_borrows(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the stall rule: borrows held long on the fake clock would count
    as slow, and that rule would serve the caller first."""
    monkeypatch.setattr(_core, "SLOW_BORROW", math.inf)


def _adaptive_core(n_idle: int, **kwargs: Any) -> PoolCore:
    core = make_core(min_size=0, max_size=4, adaptive=True, **kwargs)
    for _ in range(n_idle):
        core.entries.add(e := core.new_entry(object(), 1, 0.0))
        core.idle.append(e)
    return core


def test_the_adaptive_limit_holds_back_all_but_reservations() -> None:
    core = _adaptive_core(4, lanes=[LaneSpec("calls", 1, 2)])
    assert core.adaptive is not None and core.adaptive.floor == 2
    core.cap = core.adaptive.limit = 2  # the controller's choice
    default, calls = core.default_lane, core.lanes["calls"]
    core.enqueue(FakeWaiter(default), 0.0, deadline=10.0)  # type: ignore[arg-type]
    assert core.try_acquire(default, 0.0) is not None
    assert core.try_acquire(default, 0.0) is None  # 2 committed: 1 + calls' 1
    assert core.try_acquire(calls, 0.0) is not None  # its reservation
    assert core.try_acquire(calls, 0.0) is None  # beyond it: held back
    assert len(core.idle) == 2


def test_a_caller_holding_a_connection_passes_the_adaptive_limit() -> None:
    core = _adaptive_core(2)
    core.cap = core.adaptive.limit = 1
    lane = core.default_lane
    held = core.try_acquire(lane, 0.0)
    core.enqueue(FakeWaiter(lane), 0.0, deadline=10.0)  # type: ignore[arg-type]
    assert held is not None and core.try_acquire(lane, 0.0) is None
    held.holder = "thread 1"
    # Another caller waits; the holder asking again could wait on itself.
    assert core.try_acquire_exempt(lane, 0.0, "thread 2") is None
    assert core.try_acquire_exempt(lane, 0.0, "thread 1") is not None
    assert core.cap == 1 and core.busy == 2


def test_the_adaptive_limit_holds_no_one_back_without_a_queue() -> None:
    core = _adaptive_core(3)
    core.cap = core.adaptive.limit = 1  # what the last busy spell left
    lane = core.default_lane
    assert core.try_acquire(lane, 0.0) is not None
    assert core.try_acquire(lane, 0.0) is not None  # nobody queues: past it
    core.enqueue(FakeWaiter(lane), 0.0, deadline=10.0)  # type: ignore[arg-type]
    assert core.try_acquire(lane, 0.0) is None  # a queue: the limit holds


def test_a_holder_with_no_idle_connection_to_take_lifts_the_limit() -> None:
    core = _adaptive_core(1)
    core.cap = core.adaptive.limit = 1
    lane = core.default_lane
    held = core.try_acquire(lane, 0.0)
    assert held is not None
    held.holder = "thread 1"
    assert core.try_acquire_exempt(lane, 0.0, "thread 1") is None
    assert core.cap == 4  # so that a connection is opened for its wait:
    core.enqueue(FakeWaiter(lane), 0.0, deadline=10.0)  # type: ignore[arg-type]
    assert core.wanted_connects(0.0) == 1
    assert core.adaptive._stalls == 0  # lifted, not stalled: no backoff


def test_a_holder_held_back_by_its_lane_leaves_the_limit_alone() -> None:
    core = _adaptive_core(1, lanes=[LaneSpec("batch", 0, 1)])
    core.cap = core.adaptive.limit = 1
    batch = core.lanes["batch"]
    held = core.try_acquire(batch, 0.0)
    assert held is not None
    held.holder = "thread 1"
    assert core.try_acquire_exempt(batch, 0.0, "thread 1") is None
    assert core.cap == 1  # lifting it would not give it one


def test_a_lone_caller_with_no_idle_connection_gets_one_opened() -> None:
    core = _adaptive_core(1)
    core.cap = core.adaptive.limit = 1
    lane = core.default_lane
    assert core.try_acquire(lane, 0.0) is not None  # the only one open
    assert core.try_acquire(lane, 0.0) is None
    assert core.try_acquire_exempt(lane, 0.0, "thread 2") is None  # nobody waits
    core.enqueue(FakeWaiter(lane), 0.0, deadline=10.0)  # type: ignore[arg-type]
    assert core.cap == 4 and core.wanted_connects(0.0) == 1


def test_a_caller_max_waiting_would_refuse_takes_an_idle_one() -> None:
    core = _adaptive_core(3, max_waiting=1)
    core.cap = core.adaptive.limit = 1
    lane = core.default_lane
    assert core.try_acquire(lane, 0.0) is not None
    core.enqueue(FakeWaiter(lane), 0.0, deadline=10.0)  # type: ignore[arg-type]
    assert core.try_acquire(lane, 0.0) is None  # held back: a queue
    assert core.try_acquire_exempt(lane, 0.0, "thread 3") is not None
    assert core.cap == 1


def test_a_give_back_tells_the_limit_how_long_the_borrow_held() -> None:
    core = _adaptive_core(2)
    core.adaptive = scripted = ScriptedLimit(1, 4)  # type: ignore[assignment]
    held = core.try_acquire(core.default_lane, 1.0)
    assert held is not None
    core.enqueue(FakeWaiter(core.default_lane), 1.0, deadline=100.0)  # type: ignore[arg-type]
    core.release(held, 1.25, reusable=True)
    assert scripted.helds == [pytest.approx(0.25)] and scripted.counted == [True]


def test_a_give_back_within_a_reservation_is_not_counted_by_the_limit() -> None:
    core = _adaptive_core(2, lanes=[LaneSpec("batch", 1, 2)])
    core.adaptive = scripted = ScriptedLimit(2, 4)  # type: ignore[assignment]
    held = core.try_acquire(core.lanes["batch"], 1.0)
    assert held is not None
    core.enqueue(FakeWaiter(core.default_lane), 1.0, deadline=100.0)  # type: ignore[arg-type]
    core.release(held, 1.25, reusable=True)
    assert scripted.counted == [False]


@pytest.mark.usefixtures("no_slow_borrows")
def test_reservations_holding_a_caller_back_leave_the_limit_alone() -> None:
    core = _adaptive_core(4, lanes=[LaneSpec("admin", 4, 8)], test_while_idle=False)
    core.resize(0, 8, 0.0)
    assert core.adaptive is not None and core.adaptive.floor == 5
    core.cap = core.adaptive.limit = 5
    default = core.default_lane
    held = [core.try_acquire(default, 0.0) for _ in range(4)]  # no queue: past it
    assert all(held) and core.committed == 8
    waiter = FakeWaiter(default)
    core.enqueue(waiter, 0.0, deadline=100.0)  # type: ignore[arg-type]
    held[0].holder = "thread 1"  # type: ignore[union-attr]
    assert core.try_acquire_exempt(default, 0.0, "thread 1") is None
    core.maintain(5.0)
    assert core.cap == 5 and waiter.entry is None


@pytest.mark.usefixtures("no_slow_borrows")
def test_the_stall_rule_opens_connections_when_none_is_idle() -> None:
    core = _adaptive_core(1, test_while_idle=False)
    core.cap = core.adaptive.limit = 1
    assert core.try_acquire(core.default_lane, 0.0) is not None
    core.enqueue(FakeWaiter(core.default_lane), 0.0, deadline=100.0)  # type: ignore[arg-type]
    assert core.wanted_connects(0.0) == 0  # held back by the limit
    act = core.maintain(_core.STALL_AFTER + 0.1)
    assert core.cap == 4 and act.connects == 1


@pytest.mark.usefixtures("no_slow_borrows")
def test_a_lane_at_its_own_limit_does_not_lift_the_adaptive_limit() -> None:
    core = _adaptive_core(4, lanes=[LaneSpec("batch", 0, 1)], test_while_idle=False)
    core.cap = core.adaptive.limit = 1
    batch = core.lanes["batch"]
    assert core.try_acquire(batch, 0.0) is not None
    stuck = FakeWaiter(batch)
    core.enqueue(stuck, 0.0, deadline=100.0)  # type: ignore[arg-type]
    gone = FakeWaiter(core.default_lane)  # cancelled long ago, still queued
    core.enqueue(gone, 0.0, deadline=100.0)  # type: ignore[arg-type]
    gone.state = _core.GONE
    core.maintain(5.0)
    assert core.cap == 1 and stuck.entry is None


def test_a_raised_adaptive_limit_serves_every_waiter_it_lets_in() -> None:
    core = _adaptive_core(4)
    core.cap = core.adaptive.limit = 1
    held = core.try_acquire(core.default_lane, 0.0)
    assert held is not None
    waiters = [FakeWaiter(core.default_lane) for _ in range(4)]
    for w in waiters:
        core.enqueue(w, 0.0, deadline=10.0)  # type: ignore[arg-type]
    core.adaptive = scripted = ScriptedLimit(1, 4)  # type: ignore[assignment]
    scripted.next = 4  # its probe raises the limit at the next give-back
    first = core.release(held, 0.1, reusable=True)
    assert first is waiters[0] and first.entry is held
    woken = core.pop_woken()
    assert woken == waiters[1:4] and all(w.entry is not None for w in woken)
    assert core.busy == 4 and core.cap == 4 and core.pop_woken() == []


def test_a_timeout_says_when_the_adaptive_limit_held_the_caller_back() -> None:
    core = _adaptive_core(3)
    core.cap = core.adaptive.limit = 1
    assert core.try_acquire(core.default_lane, 0.0) is not None
    message = _messages.timeout_message(core, "p", core.default_lane, 1.0, 1.0)
    assert "1 of 4 in use" in message
    assert "adaptive_concurrency lends at most 1 at once" in message


def test_resize_lends_everything_again() -> None:
    core = _adaptive_core(2)
    assert core.adaptive is not None
    core.cap = core.adaptive.limit = 1
    core.resize(0, 6, 0.0)
    assert core.cap == core.adaptive.limit == core.adaptive.ceiling == 6


def _one_lent_one_held_back() -> tuple[PoolCore, Entry, FakeWaiter]:
    """A core lending one of two at a time: one lent, one caller queued."""
    core = _adaptive_core(2, test_while_idle=False)
    assert core.adaptive is not None
    core.cap = core.adaptive.limit = 1
    held = core.try_acquire(core.default_lane, 0.0)
    assert held is not None
    waiter = FakeWaiter(core.default_lane)
    core.enqueue(waiter, 0.0, deadline=100.0)  # type: ignore[arg-type]
    return core, held, waiter


@pytest.mark.usefixtures("no_slow_borrows")
def test_callers_waiting_long_beside_idle_connections_lift_the_limit() -> None:
    core, _, waiter = _one_lent_one_held_back()
    assert core.maintain(_core.STALL_AFTER / 2).served == []
    act = core.maintain(_core.STALL_AFTER + 0.1)
    assert act.served == [waiter] and waiter.entry is not None
    assert core.cap == core.max_size == 4


def test_a_slow_borrow_stops_counting_against_the_limit() -> None:
    core, held, waiter = _one_lent_one_held_back()
    assert core.adaptive is not None
    assert core.maintain(_core.SLOW_BORROW / 2).served == []
    act = core.maintain(_core.SLOW_BORROW + 0.01)
    assert act.served == [waiter] and waiter.entry is not None
    # One more lent beside it; the limit learned stays, and no stall counts.
    assert core.cap == 2 and core.adaptive.limit == 1
    assert core.adaptive._stalls == 0
    core.release(held, 0.2, reusable=True)
    core.release(waiter.entry, 0.2, reusable=True)
    core.maintain(0.3)
    assert core.cap == 1


def test_maintenance_watches_the_limit_only_while_it_holds_callers_back() -> None:
    core = _adaptive_core(2, test_while_idle=False)
    assert core.adaptive is not None
    assert not core.watching  # the limit lends every connection
    core.cap = core.adaptive.limit = 1
    assert not core.watching  # no queue: nobody held back
    core, held, waiter = _one_lent_one_held_back()
    assert core.watching
    core.release(held, 0.01, reusable=True)  # served: the queue is gone
    assert waiter.entry is not None and not core.watching
    plain = PoolCore(min_size=0, max_size=2)  # adaptive concurrency off
    plain.enqueue(FakeWaiter(plain.default_lane), 0.0, 100.0)  # type: ignore[arg-type]
    assert not plain.watching


def test_a_give_back_that_lowers_the_limit_asks_for_the_watch() -> None:
    core = _adaptive_core(2, test_while_idle=False)
    core.adaptive = scripted = ScriptedLimit(1, 4)  # type: ignore[assignment]
    held = [core.try_acquire(core.default_lane, 0.0) for _ in range(2)]
    core.enqueue(FakeWaiter(core.default_lane), 0.0, deadline=100.0)  # type: ignore[arg-type]
    core.enqueue(FakeWaiter(core.default_lane), 0.0, deadline=100.0)  # type: ignore[arg-type]
    assert not core.watching and not core.watch_wanted
    scripted.next = 1
    entry = held[0]
    assert entry is not None
    assert core.release(entry, 0.01, reusable=True) is None  # held back now
    assert core.watching and core.watch_wanted


def test_a_slow_borrow_within_a_reservation_lifts_nothing() -> None:
    core = _adaptive_core(3, lanes=[LaneSpec("batch", 1, 2)], test_while_idle=False)
    assert core.adaptive is not None and core.adaptive.floor == 2
    core.cap = core.adaptive.limit = 2
    assert core.try_acquire(core.lanes["batch"], 0.0) is not None  # reserved
    assert core.try_acquire(core.default_lane, 1.0) is not None
    waiter = FakeWaiter(core.default_lane)
    core.enqueue(waiter, 1.0, deadline=100.0)  # type: ignore[arg-type]
    # The batch borrow is slow, but the limit never counted it.
    assert core.maintain(1.0 + _core.SLOW_BORROW / 2).served == []
    assert core.cap == 2 and waiter.entry is None


class CoreMachine(RuleBasedStateMachine):
    """Random walks over the core; invariants after every step."""

    @initialize(
        max_size=st.integers(1, 6),
        reserved=st.lists(st.integers(0, 2), min_size=0, max_size=3),
        adaptive=st.booleans(),
    )
    def setup(self, max_size: int, reserved: list[int], adaptive: bool) -> None:
        lanes = []
        left = max_size
        for i, r in enumerate(reserved):
            r = min(r, left)
            left -= r
            lanes.append(LaneSpec(f"l{i}", r, max(1, min(max_size, r + 1 + i))))
        self.core = make_core(
            min_size=min(1, max_size),
            max_size=max_size,
            lanes=lanes,
            max_lifetime=50.0,
            idle_timeout=5.0,
            leak_threshold=20.0,
            adaptive=adaptive,
        )
        if adaptive:  # moved by the rule below, not by measurements
            self.core.adaptive = ScriptedLimit(self.core.adaptive.floor, max_size)  # type: ignore[union-attr]
        self.now = 0.0
        self.held: list[Entry] = []
        self.waiters: list[FakeWaiter] = []

    def _collect(self, waiter: Any) -> None:
        if waiter is not None:
            assert waiter.state == _core.SERVED and waiter.entry is not None
            self.held.append(waiter.entry)

    @rule(lane=st.integers(0, 3), wait=st.floats(0.1, 5))
    def borrow(self, lane: int, wait: float) -> None:
        lanes = list(self.core.lanes.values())
        chosen = lanes[lane % len(lanes)]
        entry = self.core.try_acquire(chosen, self.now)
        if entry is not None:
            self.held.append(entry)
            return
        waiter = FakeWaiter(chosen)
        self.core.enqueue(waiter, self.now, self.now + wait)  # type: ignore[arg-type]
        self.waiters.append(waiter)
        self.core.wanted_connects(self.now)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), reusable=st.booleans())
    def give_back(self, i: int, reusable: bool) -> None:
        entry = self.held.pop(i % len(self.held))
        self._collect(self.core.release(entry, self.now, reusable))
        for waiter in self.core.pop_woken():
            self._collect(waiter)
        self.core.pop_to_close()
        self.core.wanted_connects(self.now)

    @precondition(lambda self: self.core.opening)
    @rule(ok=st.booleans())
    def connect_done(self, ok: bool) -> None:
        if ok:
            self._collect(open_one(self.core, self.now))
        else:
            self.core.connect_failed("refused", self.now, unreachable=True)

    @rule(dt=st.floats(0.0, 3.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        for waiter in list(self.waiters):
            if waiter.state == _core.WAITING:
                self.core.expire_waiter(waiter, self.now)  # type: ignore[arg-type]
        act = self.core.maintain(self.now)
        for waiter in act.served:
            self._collect(waiter)
        for entry in act.check:
            self._collect(self.core.check_done(entry, self.now, ok=entry.pid % 3 != 0))
        self.core.pop_to_close()

    @precondition(lambda self: self.core.adaptive is not None)
    @rule(limit=st.integers(1, 6))
    def move_adaptive_limit(self, limit: int) -> None:
        """A probe picks `limit`, at a give-back with callers queuing if there
        is one to make, else as the maintenance does after a stall."""
        core = self.core
        scripted = core.adaptive
        assert isinstance(scripted, ScriptedLimit)
        scripted.next = max(scripted.floor, min(limit, scripted.ceiling))
        if self.held and core.n_waiting:
            self._collect(core.release(self.held.pop(0), self.now, True))
        else:
            core.cap = scripted.limit = scripted.next
            core._serve_more(self.now)
        for waiter in core.pop_woken():
            self._collect(waiter)

    @precondition(lambda self: any(w.state == _core.WAITING for w in self.waiters))
    @rule(i=st.integers(0, 100))
    def cancel(self, i: int) -> None:
        waiting = [w for w in self.waiters if w.state == _core.WAITING]
        assert self.core.cancel_waiter(waiting[i % len(waiting)])  # type: ignore[arg-type]

    @invariant()
    def accounting_adds_up(self) -> None:
        core = self.core
        lanes = core.lanes.values()
        assert core.size <= core.max_size
        assert core.committed == sum(max(x.in_use, x.reserved) for x in lanes)
        assert core.committed <= core.max_size
        for lane in lanes:
            assert 0 <= lane.in_use <= lane.limit
            assert lane.n_waiting == sum(
                1 for w in self.waiters if w.lane is lane and w.state == _core.WAITING
            )
        busy = [e for e in core.entries if e.state == BUSY]
        assert core.busy == len(busy) == sum(x.in_use for x in lanes)
        assert sorted(map(id, busy)) == sorted(map(id, self.held))  # one owner each
        assert len(set(map(id, core.idle))) == len(core.idle)
        assert all(e.state == IDLE and e in core.entries for e in core.idle)
        assert core.n_waiting == sum(x.n_waiting for x in lanes)
        assert core.wait_percentile(0.99) <= max(core.wait_max, 0.0) or math.isclose(
            core.wait_percentile(0.99), core.wait_max
        )

    @invariant()
    def no_one_waits_for_an_idle_connection(self) -> None:
        core = self.core
        if core.idle:
            for lane in core.lanes.values():
                if lane.n_waiting:
                    assert not core.can_take(lane), lane


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
