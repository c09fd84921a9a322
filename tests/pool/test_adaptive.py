"""The adaptive limit's controller on a fake clock, against model workloads.

Each model gives the throughput (borrows ended per second) a pool makes at a
given limit; `run()` feeds the controller one ended borrow at a time at that
rate, as the pool's core does while callers queue. A borrow's `held` time is
the one it would take running alone (one connection: 1 / model(1)), the
shortest a pool sees.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from itertools import pairwise

from pgwarden.pool import _adaptive
from pgwarden.pool._adaptive import AdaptiveLimit

Model = Callable[[int], float]


def gil_bound(limit: int) -> float:
    """Short queries from threads: each borrower more costs GIL hand-offs
    (shaped on bench/: 8,000/s over 1 connection, 3,000/s over 16)."""
    return 8000.0 / float(limit) ** 0.35


def server_bound(limit: int) -> float:
    """Borrowers waiting 4 ms on the server: each connection more adds."""
    return limit / 0.004


def peaked(limit: int) -> float:
    return {1: 3000.0, 2: 4000.0, 4: 5000.0, 8: 4000.0}.get(limit, 3000.0)


def run(
    limiter: AdaptiveLimit,
    model: Model,
    seconds: float,
    now: float = 0.0,
    noise: random.Random | None = None,
    held: float | None = None,
) -> tuple[float, list[int]]:
    """Feed `seconds` of ended borrows, each `held` that long (by default,
    as long as alone); return the clock and the limit each ended under."""
    seen = []
    end = now + seconds
    if held is None:
        held = 1.0 / model(1)
    while now < end:
        rate = model(limiter.limit)
        if noise is not None:
            rate *= noise.uniform(0.85, 1.15)
        now += 1.0 / rate
        seen.append(limiter.limit)
        limiter.ended(now, held)
    return now, seen


def settled_at(seen: list[int]) -> int:
    """The limit most borrows of the second half ended under."""
    return Counter(seen[len(seen) // 2 :]).most_common(1)[0][0]


def _kept_floor() -> tuple[AdaptiveLimit, float]:
    limiter = AdaptiveLimit(1, 16)
    now, _ = run(limiter, gil_bound, 5.0)
    assert limiter.kept == 1
    return limiter, now


def _probing_the_floor() -> tuple[AdaptiveLimit, float]:
    """A window into the first probe of the floor."""
    limiter = AdaptiveLimit(1, 16)
    now = 0.0
    while limiter._phase < 1:
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 1.0 / gil_bound(1))
    return limiter, now


def test_it_lends_fewer_connections_when_that_is_faster() -> None:
    limiter = AdaptiveLimit(1, 16)
    # A hold at 16, a probe of 1 (PROBE_SKIP + PROBE_WINDOWS windows), one
    # of 16 again at once (far behind: one window), a hold at 1, the same
    # at 16 again to confirm: 1 it is.
    now, seen = run(limiter, gil_bound, 5.0)
    assert limiter.limit == 1, seen[-20:]
    assert limiter.probes_total == 2
    _, seen = run(limiter, gil_bound, 5.0, now)
    # Probing up now and then costs a window, no more.
    assert seen.count(1) / len(seen) > 0.97


def test_it_keeps_every_connection_when_each_adds_throughput() -> None:
    limiter = AdaptiveLimit(1, 16)
    _, seen = run(limiter, server_bound, 10.0)
    assert limiter.limit == 16
    # One connection at a time can't make 250 borrows/s of 4 ms each: no
    # probe at all.
    assert set(seen) == {16} and limiter.probes_total == 0


def test_the_first_probe_comes_after_a_short_hold() -> None:
    limiter = AdaptiveLimit(1, 16)
    now = 0.0
    while limiter.limit == 16:
        now += 1.0 / gil_bound(16)
        limiter.ended(now, 1.0 / gil_bound(1))
    first = _adaptive.FIRST_HOLD * _adaptive.WINDOW_SECONDS
    assert first <= now < first * 1.1


def test_borrows_that_look_longer_at_the_ceiling_still_get_a_probe() -> None:
    # At the ceiling, GIL-bound borrows also wait for the GIL while they hold
    # their connection: the shortest seen is several times its time alone.
    limiter = AdaptiveLimit(1, 16)
    now = 0.0
    while now < 2.0 and not limiter.probes_total:
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 0.0012)
    assert limiter.probes_total == 1


def test_a_probe_far_behind_ends_after_its_first_window() -> None:
    # As server_bound, but borrows look short: the probe is tried.
    limiter = AdaptiveLimit(1, 16)
    now, held, seen = 0.0, 0.0001, []
    while now < 2.0:
        now += 1.0 / server_bound(limiter.limit)
        seen.append(limiter.limit)
        limiter.ended(now, held)
    assert limiter.probes_total >= 1
    # Per probe: one window of WINDOW_BORROWS at this rate (the model's
    # borrows are lent one after the other).
    at_one = seen.count(1) / limiter.probes_total
    assert at_one == _adaptive.WINDOW_BORROWS


def test_probes_that_change_nothing_come_ever_more_rarely() -> None:
    limiter = AdaptiveLimit(1, 8)
    now, seen = run(limiter, short_transactions, 40.0)
    assert set(seen) == {1, 8} and limiter.probes_total <= 5
    # Holds of 8, 32, 128 windows of 50 ms, then SETTLE_MAX (25.6 s).
    probes = limiter.probes_total
    _, seen = run(limiter, short_transactions, 20.0, now)
    assert limiter.probes_total - probes <= 1
    assert seen.count(8) / len(seen) > 0.99


def short_transactions(limit: int) -> float:
    """Three round trips per borrow: each connection less costs throughput."""
    return {1: 3000.0, 2: 3500.0, 4: 4000.0}.get(limit, 5000.0)


def test_a_step_down_that_only_looked_faster_is_taken_back() -> None:
    # For half a second after each change to the floor, it runs fast (what
    # the ceiling left behind, or a lucky moment): the probe keeps it, the
    # holds that confirm it take it back.
    limiter = AdaptiveLimit(1, 8)
    since, refuted, holds = 0.0, 0, []
    seen, now = [], 0.0
    while now < 60.0:
        before = limiter.limit
        fast = limiter.limit == 1 and now - since < 0.5
        now += 1.0 / (8000.0 if fast else short_transactions(limiter.limit))
        seen.append(limiter.limit)
        limiter.ended(now, 1.0 / short_transactions(1))
        if limiter.limit != before:
            since = now
        if limiter._refuted > refuted:
            refuted = limiter._refuted
            holds.append(limiter._hold)
    assert settled_at(seen) == 8, Counter(seen)
    assert seen.count(8) / len(seen) > 0.6, Counter(seen)
    # Each refuted step down doubles the wait before the next probe.
    assert len(holds) >= 3 and all(b == 2 * a for a, b in pairwise(holds)), holds


def slow_start(now: float, limit: int) -> float:
    """Short transactions, the floor at 0.62x the ceiling; but through the
    first hold everything runs at 0.45x: a load warming up (short
    transactions made 0.3x to 0.5x their later throughput in their first
    0.2 s)."""
    rate = 3400.0 if limit == 1 else 5500.0
    first_hold = (_adaptive.FIRST_HOLD + 1) * _adaptive.WINDOW_SECONDS
    return rate * 0.45 if now < first_hold else rate


def test_a_floor_that_only_beat_a_slow_start_is_given_up_at_once() -> None:
    limiter = AdaptiveLimit(1, 16)
    now, at_floor = 0.0, 0.0
    while now < 4.0:
        step = 1.0 / slow_start(now, limiter.limit)
        now += step
        at_floor += step if limiter.limit == 1 else 0.0
        limiter.ended(now, 1.0 / 3400.0)
    # The probe of the floor beat the slow first hold; the ceiling, tried
    # back at once, beat the floor: that step down is refuted there, after
    # the probe's 0.35 s at the floor (not the 1.6 s of a confirmation).
    assert limiter._refuted == 1 and limiter.limit == limiter.kept == 16
    probe = (_adaptive.PROBE_SKIP + _adaptive.PROBE_WINDOWS) * _adaptive.WINDOW_SECONDS
    assert probe * 0.9 < at_floor < probe * 1.2, at_floor


def test_kept_is_the_ceiling_while_it_is_tried_back_after_a_step_down() -> None:
    limiter = AdaptiveLimit(1, 16)
    now = 0.0
    while not limiter._confirming:
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 1.0 / gil_bound(1))
    assert limiter._phase == 0 and (limiter.limit, limiter.kept) == (16, 16)


def test_after_a_lull_a_floor_far_behind_is_given_up_soon() -> None:
    # The probe has kept the floor, and holds it to confirm it.
    limiter, now = _confirming_at_the_floor()
    assert limiter.kept == 16
    # A lull, then borrowers that wait on the server: the floor is not theirs.
    now += _adaptive.LULL + 1.0
    assert limiter.ended(now, 0.004) is False  # the hold goes on...
    _, seen = run(limiter, server_bound, 10.0, now)
    # ...for one window: far behind what the ceiling made before.
    one = _adaptive.WINDOW_BORROWS
    assert seen[:one] == [1] * one and seen.count(1) == one
    assert limiter.kept == 16 and limiter._refuted == 1


def _time_at_the_floor(limiter: AdaptiveLimit, model: Model, now: float) -> float:
    """Seconds spent at the floor over 4 s of `model`."""
    at_floor, end = 0.0, now + 4.0
    while now < end:
        step = 1.0 / model(limiter.limit)
        now += step
        at_floor += step if limiter.limit == limiter.floor else 0.0
        limiter.ended(now, 1.0 / model(1))
    return at_floor


def test_a_lull_while_the_ceiling_is_tried_back_hides_no_change_of_load() -> None:
    # The floor's probe won; the ceiling is tried back, and a lull comes.
    limiter, now = AdaptiveLimit(1, 16), 0.0
    while not limiter._confirming:
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 1.0 / gil_bound(1))
    assert limiter.limit == 16 and limiter._phase == 0
    # Borrowers that wait on the server come back: the ceiling, measured
    # now, loses to the floor's throughput from before the lull, but the
    # floor's first window is checked against it.
    at_floor = _time_at_the_floor(limiter, server_bound, now + _adaptive.LULL + 1.0)
    assert at_floor < 0.1 and limiter._refuted == 1 and limiter.kept == 16


def test_a_lull_while_the_ceiling_is_held_again_hides_no_change_of_load() -> None:
    # The confirmation holds the ceiling again, after the floor...
    limiter, now = AdaptiveLimit(1, 16), 0.0
    while limiter._recheck is None:
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 1.0 / gil_bound(1))
    while limiter._held < _adaptive.CONFIRM_SKIP + 4:  # ...counting a while
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 1.0 / gil_bound(1))
    # Then a lull, and borrowers that wait on the server: that hold made
    # less than the floor did before, yet the floor is left at once.
    at_floor = _time_at_the_floor(limiter, server_bound, now + _adaptive.LULL + 1.0)
    assert at_floor < 0.1 and limiter.kept == 16


def test_after_a_lull_a_kept_floor_far_behind_is_given_up_soon() -> None:
    limiter, now = _kept_floor()
    now, seen = run(limiter, server_bound, 2.0, now + _adaptive.LULL + 1.0)
    # One window, after the borrow that ended the lull.
    assert seen.count(1) == _adaptive.WINDOW_BORROWS + 1
    assert limiter.kept == 16 and limiter._refuted == 1


def test_a_backoff_is_never_shortened() -> None:
    limiter = AdaptiveLimit(1, 16)
    for _ in range(6):
        limiter.stalled(0.0)
    assert limiter._hold == _adaptive.HOLD_MAX << 5
    limiter.lift(0.0)  # a caller it must not hold back
    assert limiter._hold == _adaptive.HOLD_MAX << 5
    fresh = AdaptiveLimit(1, 16)
    fresh._hold = _adaptive.SETTLE_MAX
    fresh.stalled(0.0)  # the first stall: not shorter than that
    assert fresh._hold == _adaptive.SETTLE_MAX
    # Probes that change nothing (flat: the floor never wins) keep it.
    probes = limiter.probes_total
    run(limiter, lambda limit: 2000.0, 200.0)
    assert limiter.probes_total - probes <= 2
    assert limiter._hold >= _adaptive.HOLD_MAX << 5


def test_long_borrows_keep_it_off_the_floor() -> None:
    # Faster one at a time, but one borrow in 500 holds its connection 50 ms:
    # at the floor every queued caller would wait for it.
    limiter = AdaptiveLimit(1, 16)
    now, seen, n = 0.0, [], 0
    while now < 30.0:
        now += 1.0 / gil_bound(limiter.limit)
        n += 1
        seen.append(limiter.limit)
        held = 0.05 if n % 500 == 0 else 1.0 / gil_bound(1)
        limiter.ended(now, held)
    assert limiter.probes_total >= 1
    assert seen.count(16) / len(seen) > 0.9, Counter(seen)


def test_a_kept_floor_is_left_when_long_borrows_appear() -> None:
    limiter = AdaptiveLimit(1, 16)
    now, _ = run(limiter, gil_bound, 10.0)
    assert limiter.kept == 1
    # Now one borrow in 500 holds its connection 50 ms: left within a second.
    for n in range(1, 8000):
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 0.05 if n % 500 == 0 else 1.0 / gil_bound(1))
        if limiter.limit == 16:
            break
    assert limiter.kept == 16 and limiter._refuted == 1


def _confirming_at_the_floor() -> tuple[AdaptiveLimit, float]:
    limiter = AdaptiveLimit(1, 16)
    now = 0.0
    while not (limiter._confirming and limiter.limit == 1):
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 1.0 / gil_bound(1))
    return limiter, now


def test_only_long_borrows_lent_at_the_floor_give_it_up() -> None:
    # Lent before the step down (at the ceiling), or in a lane's reservation
    # (never held back): the queue did not wait on those.
    limiter, now = _confirming_at_the_floor()
    now += 0.001
    limiter.ended(now, now - limiter._changed_at + 0.01)  # before the change
    limiter.ended(now, 0.01, counted=False)
    now += 0.001
    limiter.ended(now, 0.15, counted=False)
    now, _ = run(limiter, gil_bound, 0.2, now)
    assert limiter.limit == 1 and limiter._refuted == 0
    # Lent at the floor: even in a window that doesn't count for throughput.
    now += 0.03
    limiter.ended(now, 0.025)
    run(limiter, gil_bound, 0.2, now)
    assert limiter.limit == 16 and limiter._refuted == 1


def test_it_tries_no_limit_in_between() -> None:
    # Only the floor and the ceiling: limits in between walked by noise
    # where throughput is flat (see the module's docstring).
    limiter = AdaptiveLimit(1, 8)
    _, seen = run(limiter, peaked, 10.0)
    assert set(seen) == {1, 8}
    assert settled_at(seen) == 8


def test_noise_does_not_lead_it_astray() -> None:
    for seed in range(5):
        noise = random.Random(seed)
        limiter = AdaptiveLimit(1, 16)
        _, seen = run(limiter, gil_bound, 10.0, noise=noise)
        assert settled_at(seen) == 1, seed
        limiter = AdaptiveLimit(1, 16)
        _, seen = run(limiter, server_bound, 10.0, noise=noise)
        assert settled_at(seen) == 16, seed


def test_it_never_goes_below_the_floor_or_above_the_ceiling() -> None:
    limiter = AdaptiveLimit(3, 16)
    _, seen = run(limiter, gil_bound, 5.0)
    assert min(seen) == 3 and max(seen) == 16
    limiter = AdaptiveLimit(20, 16)  # reservations fill the pool
    _, seen = run(limiter, gil_bound, 1.0)
    assert set(seen) == {16} and limiter.probes_total == 0


def test_a_busy_spell_starts_where_the_last_one_ended() -> None:
    limiter = AdaptiveLimit(1, 16)
    now, _ = run(limiter, gil_bound, 5.0)
    assert limiter.limit == 1
    now, seen = run(limiter, gil_bound, 0.2, now + 10.0)
    assert seen[0] == 1


def test_stalled_lends_everything_and_waits_long_before_probing() -> None:
    limiter = AdaptiveLimit(1, 16)
    now, _ = run(limiter, gil_bound, 5.0)
    assert limiter.limit == 1
    limiter.stalled(now)
    assert limiter.limit == 16
    probes = limiter.probes_total
    seconds = (_adaptive.HOLD_MAX - 1) * _adaptive.WINDOW_SECONDS
    now, seen = run(limiter, lambda limit: 1000.0, seconds, now)
    assert set(seen) == {16} and limiter.probes_total == probes
    # Back to 1, confirmed; a stall again: it waits twice as long.
    now, _ = run(limiter, gil_bound, 10.0, now)
    assert limiter.kept == 1
    limiter.stalled(now)
    probes = limiter.probes_total
    seconds = (2 * _adaptive.HOLD_MAX - 1) * _adaptive.WINDOW_SECONDS
    _, seen = run(limiter, lambda limit: 1000.0, seconds, now)
    assert set(seen) == {16} and limiter.probes_total == probes


def test_lifting_the_limit_for_a_caller_is_no_stall() -> None:
    # A caller the limit must not hold back, with no idle connection: the
    # limit is lifted so that one is opened, but that says nothing of the
    # workload.
    limiter = AdaptiveLimit(1, 16)
    now, _ = run(limiter, gil_bound, 5.0)
    assert limiter.limit == 1
    for _ in range(3):
        limiter.lift(now)
    assert limiter.limit == 16
    probes = limiter.probes_total
    windows = _adaptive.HOLD_MAX + _adaptive.PROBE_SKIP + 2
    run(limiter, gil_bound, windows * _adaptive.WINDOW_SECONDS, now)
    assert limiter.probes_total == probes + 1


def test_resize_starts_over_at_the_new_ceiling() -> None:
    limiter = AdaptiveLimit(1, 16)
    now, _ = run(limiter, gil_bound, 1.0)
    limiter.resize(2, 8, now)
    assert (limiter.floor, limiter.limit, limiter.ceiling) == (2, 8, 8)
    _, seen = run(limiter, gil_bound, 2.0, 100.0)
    assert min(seen) == 2


def test_kept_is_the_limit_a_probe_is_tried_against() -> None:
    limiter = AdaptiveLimit(1, 16)
    now = 0.0
    while limiter.limit == 16:
        now += 0.001
        limiter.ended(now, 0.0001)
    assert (limiter.limit, limiter.kept) == (1, 16)


def test_kept_is_a_step_down_only_once_confirmed() -> None:
    limiter = AdaptiveLimit(1, 16)
    now, kept = 0.0, []
    while now < 5.0:
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 0.0001)
        kept.append(limiter.kept)
    # 16 through the probes and the holds that confirm them, then 1.
    assert kept[0] == 16 and kept[-1] == 1
    assert set(kept) == {16, 1}


def test_a_change_reports_itself() -> None:
    limiter = AdaptiveLimit(1, 4)
    now, changes = 0.0, []
    for _ in range(2000):
        now += 0.001
        before = limiter.limit
        if limiter.ended(now, 0.0001):
            changes.append((before, limiter.limit))
        else:
            assert limiter.limit == before
    assert changes and all(a != b for a, b in changes)


# -- bursts: lulls are cut out ----------------------------------------------


def bursts(
    limiter: AdaptiveLimit,
    model: Model,
    n: int,
    seconds: float,
    now: float,
    held: float | None = None,
) -> tuple[float, list[int]]:
    """`n` bursts of `seconds` of queueing each, a second apart."""
    seen: list[int] = []
    for _ in range(n):
        now, burst = run(limiter, model, seconds, now + 1.0, held=held)
        seen += burst
    return now, seen


def lopsided(limit: int) -> float:
    """The floor makes a third of the ceiling's throughput: not far behind
    enough to tell at once."""
    return 2000.0 if limit == 1 else 6000.0


def test_bursts_shorter_than_a_confirmation_get_the_floor() -> None:
    limiter = AdaptiveLimit(1, 16)
    _, seen = bursts(limiter, gil_bound, 30, 0.3, 0.0)
    # The first hold, the probe, the confirmation at the floor and at the
    # ceiling each span several bursts: nothing starts over at a lull.
    assert limiter.kept == 1 and limiter._refuted == 0
    # The floor's, the ceiling's right after, and later the ceiling's again.
    assert limiter.probes_total <= 3
    assert seen.count(1) / len(seen) > 0.7


def test_a_probe_goes_on_after_a_lull() -> None:
    limiter, now = _probing_the_floor()
    now, _ = run(limiter, gil_bound, 0.2, now + _adaptive.LULL + 1.0)
    assert limiter.limit == 1 and limiter._phase >= 2  # not started over
    run(limiter, gil_bound, 1.0, now)
    # The floor won; the ceiling, tried back at once, lost: confirming.
    assert limiter.probes_total == 2 and limiter._confirming
    assert limiter.limit == 1 and limiter._phase == -1


def test_after_a_lull_a_probe_of_the_floor_far_behind_ends() -> None:
    limiter, now = _probing_the_floor()
    now, seen = run(limiter, server_bound, 2.0, now + _adaptive.LULL + 1.0)
    # The window that shows the load coming back is checked.
    assert seen.count(1) == _adaptive.WINDOW_BORROWS + 1
    assert limiter.limit == 16 and limiter._refuted == 0


def test_bursts_too_short_for_the_check_still_get_it() -> None:
    # A floor kept, then bursts of 12 borrows that wait 4 ms on the server:
    # under a window each. What a burst made is judged once it ends.
    limiter, now = _kept_floor()
    seen: list[int] = []
    for _ in range(50):
        now += 1.0
        for _ in range(12):
            now += 1.0 / server_bound(limiter.limit)
            seen.append(limiter.limit)
            limiter.ended(now, 0.004)
    # The first burst, and the borrow of the next one that judged it.
    assert seen.count(1) == 13 and limiter.kept == 16 and limiter._refuted == 1


def test_bursts_of_one_window_measure_nothing_and_change_nothing() -> None:
    # The window after a lull doesn't count, and the next never ends.
    limiter = AdaptiveLimit(1, 16)
    _, seen = bursts(limiter, gil_bound, 50, 0.07, 0.0)
    assert set(seen) == {16} and limiter.probes_total == 0


def test_bursts_of_two_windows_still_end_a_confirmation() -> None:
    # Each burst: the window that doesn't count, and one that does.
    limiter, now = _confirming_at_the_floor()
    _, seen = bursts(limiter, lopsided, 100, 0.1, now, held=0.0005)
    assert limiter.kept == 16 and limiter._refuted == 1
    assert seen.count(1) / len(seen) < 0.5


def test_a_kept_floor_is_probed_again_under_short_bursts() -> None:
    limiter, now = _kept_floor()
    _, seen = bursts(limiter, lopsided, 300, 0.3, now, held=0.0005)
    assert limiter.kept == 16
    assert seen.count(1) / len(seen) < 0.1


def test_a_probe_is_not_started_over_in_every_burst() -> None:
    def slightly_slower(limit: int) -> float:  # not far enough to abort
        return 3250.0 if limit == 1 else 5000.0

    limiter = AdaptiveLimit(1, 16)
    _, seen = bursts(limiter, slightly_slower, 400, 0.3, 0.0, held=0.0001)
    assert limiter.probes_total <= 6
    assert seen.count(1) / len(seen) < 0.05


def test_the_check_after_a_lull_keeps_the_ceilings_throughput() -> None:
    # However long the floor has been kept, the check compares it with what
    # the ceiling made, not with what the floor made since.
    for seconds in (5.0, 9.0):
        limiter = AdaptiveLimit(1, 16)
        run(limiter, gil_bound, seconds)
        assert limiter.kept == 1
        assert limiter._ceiling_rate < gil_bound(1) * 0.5


def test_a_long_borrow_right_after_a_lull_gives_up_the_floor() -> None:
    for at in (0.04, 0.29):  # in the first window, in the one the lull cuts
        limiter, now = _kept_floor()
        start = now = now + 1.0
        while now < start + 0.3:
            now += 1.0 / gil_bound(limiter.limit)
            long = start + at <= now < start + at + 0.001
            limiter.ended(now, 0.03 if long else 1.0 / gil_bound(1))
        run(limiter, gil_bound, 0.1, now + 1.0)
        assert limiter.kept == 16 and limiter._refuted == 1, at


def test_spells_too_short_to_check_are_added_up() -> None:
    limiter, now = _kept_floor()
    seen: list[int] = []
    for _ in range(20):  # bursts of 7 borrows that wait 4 ms on the server
        now += 1.0
        for _ in range(7):
            now += 1.0 / server_bound(limiter.limit)
            seen.append(limiter.limit)
            limiter.ended(now, 0.004)
    assert limiter.kept == 16 and seen.count(1) <= 2 * 7 + 1


def test_a_kept_floor_finds_out_soon_that_the_load_changed() -> None:
    # No lull: after a long time at the floor, borrowers wait on the server.
    limiter = AdaptiveLimit(1, 16)
    now, _ = run(limiter, gil_bound, 44.0)
    assert limiter.kept == 1
    at_floor = 0.0
    while limiter.kept == 1 or limiter.limit == 1:
        step = 1.0 / server_bound(limiter.limit)
        now += step
        at_floor += step if limiter.limit == 1 else 0.0
        limiter.ended(now, 0.004)
    # Two holds of HOLD_MAX windows at most (the first one's throughput still
    # mixes in the old load's), at 250 borrows/s: 16 borrows a window.
    hold = _adaptive.HOLD_MAX * _adaptive.WINDOW_BORROWS / 250
    assert at_floor < 2 * hold + 1.0


def test_a_probe_that_measured_nothing_decides_nothing() -> None:
    limiter, now = _kept_floor()
    while limiter._phase < 0:  # the probe of the ceiling starts
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 1.0 / gil_bound(1))
    hold = limiter._hold
    # Bursts of one window: each the first after a lull, which doesn't count.
    now, _ = bursts(limiter, lopsided, 12, 0.07, now, held=0.0005)
    assert limiter.limit == 1 and limiter._hold == hold


def test_a_load_coming_back_slowly_after_a_lull_keeps_the_floor() -> None:
    # Its first window after the lull makes half the ceiling's throughput
    # (threads waking up, say), then it runs as before.
    limiter, now = _kept_floor()
    now += 1.0
    start = now
    while now < start + 0.5:
        slow = now < start + _adaptive.WINDOW_SECONDS * 1.5
        now += 1.0 / (gil_bound(16) * 0.5 if slow else gil_bound(limiter.limit))
        limiter.ended(now, 1.0 / gil_bound(1))
    assert limiter.kept == 1 and limiter._refuted == 0


def test_a_confirmation_whose_ceiling_measured_nothing_keeps_no_floor() -> None:
    limiter, now = _confirming_at_the_floor()
    while limiter._recheck is None:  # the hold at the floor, measured
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now, 1.0 / gil_bound(1))
    # The ceiling's hold in bursts of one window, none of which counts.
    while limiter._confirming:
        now, _ = run(limiter, gil_bound, 0.07, now + 1.0)
    assert limiter.kept == 16 and limiter._refuted == 1


def test_a_probe_of_the_floor_that_measured_nothing_decides_nothing() -> None:
    limiter, now = _probing_the_floor()
    hold = limiter._hold
    # Bursts of one window: each the first after a lull, which doesn't count.
    now, _ = bursts(limiter, gil_bound, 12, 0.07, now)
    assert limiter.limit == 16 and limiter._hold == hold


def test_after_a_lull_a_floor_at_a_fifth_of_the_ceiling_is_given_up() -> None:
    limiter, now = _kept_floor()
    fifth = 0.2 * limiter._ceiling_rate
    now, seen = run(limiter, lambda limit: fifth, 1.0, now + 1.0, held=0.0001)
    # One window (of WINDOW_SECONDS, at this rate), after the lull's borrow.
    assert limiter.kept == 16
    assert seen.count(1) <= fifth * _adaptive.WINDOW_SECONDS + 2
