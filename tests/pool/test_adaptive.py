"""The adaptive limit's controller on a fake clock, against model workloads.

Each model gives the throughput (borrows ended per second) a pool makes at a
given limit; `run()` feeds the controller one ended borrow at a time at that
rate, as the pool's core does while callers queue.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

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
) -> tuple[float, list[int]]:
    """Feed `seconds` of ended borrows; return the clock and the limit each
    borrow ended under."""
    seen = []
    end = now + seconds
    while now < end:
        rate = model(limiter.limit)
        if noise is not None:
            rate *= noise.uniform(0.85, 1.15)
        now += 1.0 / rate
        seen.append(limiter.limit)
        limiter.ended(now)
    return now, seen


def settled_at(seen: list[int]) -> int:
    """The limit most borrows of the second half ended under."""
    return Counter(seen[len(seen) // 2 :]).most_common(1)[0][0]


def test_it_lends_fewer_connections_when_that_is_faster() -> None:
    limiter = AdaptiveLimit(1, 16)
    # A short hold at 16, four probes (8, 4, 2, 1) of 2 x PAIRS windows each,
    # a hold at 1, the same at 16 again to confirm: 1 it is.
    now, seen = run(limiter, gil_bound, 5.0)
    assert limiter.limit == 1, seen[-20:]
    _, seen = run(limiter, gil_bound, 5.0, now)
    # Probing up now and then costs a few borrows, no more.
    assert seen.count(1) / len(seen) > 0.9


def test_it_keeps_every_connection_when_each_adds_throughput() -> None:
    limiter = AdaptiveLimit(1, 16)
    _, seen = run(limiter, server_bound, 10.0)
    assert limiter.limit == 16
    assert seen.count(16) / len(seen) > 0.9


def lagging(model: Model, lag: float) -> Callable[[AdaptiveLimit], Model]:
    """`model`, but a changed limit shows only after `lag` seconds: what the
    previous limit left running still counts for a while."""

    def bind(limiter: AdaptiveLimit) -> Model:
        state = {"limit": limiter.limit, "shown": limiter.limit, "since": 0.0}

        def rate(limit: int) -> float:
            now = state["clock"]
            if limit != state["limit"]:
                state.update(limit=limit, since=now)
            if now - state["since"] >= lag:
                state["shown"] = limit
            return model(int(state["shown"]))

        state["clock"] = 0.0
        rate.state = state  # type: ignore[attr-defined]
        return rate

    return bind


def short_transactions(limit: int) -> float:
    """Three round trips per borrow: each connection less costs throughput."""
    return {1: 3000.0, 2: 3500.0, 4: 4000.0}.get(limit, 5000.0)


def test_a_step_down_that_only_looked_faster_is_taken_back() -> None:
    # The probe's windows at 4 still run on what 8 left: 4 looks as fast.
    limiter = AdaptiveLimit(1, 8)
    model = lagging(short_transactions, _adaptive.WINDOW_SECONDS * 1.5)(limiter)
    seen, now = [], 0.0
    while now < 20.0:
        model.state["clock"] = now  # type: ignore[attr-defined]
        now += 1.0 / model(limiter.limit)
        seen.append(limiter.limit)
        limiter.ended(now)
    assert settled_at(seen) == 8, Counter(seen)
    assert seen.count(8) / len(seen) > 0.6, Counter(seen)


def test_it_finds_the_best_limit_in_between() -> None:
    limiter = AdaptiveLimit(1, 8)
    _, seen = run(limiter, peaked, 10.0)
    assert settled_at(seen) == 4


def test_noise_does_not_lead_it_astray() -> None:
    for seed in range(5):
        noise = random.Random(seed)
        limiter = AdaptiveLimit(1, 16)
        _, seen = run(limiter, gil_bound, 10.0, noise=noise)
        assert settled_at(seen) <= 2, seed
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


def test_a_lull_voids_a_running_probe() -> None:
    limiter = AdaptiveLimit(1, 16)
    now = 0.0
    while limiter.limit == 16:  # until the first probe starts
        now += 0.001
        limiter.ended(now)
    assert limiter.limit == 8
    # No queue for a while: the probe's windows would count the lull.
    assert limiter.ended(now + _adaptive.LULL + 0.1) is True
    assert limiter.limit == 16


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
    limiter.stalled()
    assert limiter.limit == 16
    probes = limiter.probes_total
    seconds = (_adaptive.HOLD_MAX - 1) * _adaptive.WINDOW_SECONDS
    _, seen = run(limiter, lambda limit: 1000.0, seconds, now)
    assert set(seen) == {16} and limiter.probes_total == probes


def test_resize_starts_over_at_the_new_ceiling() -> None:
    limiter = AdaptiveLimit(1, 16)
    run(limiter, gil_bound, 1.0)
    limiter.resize(2, 8)
    assert (limiter.floor, limiter.limit, limiter.ceiling) == (2, 8, 8)
    _, seen = run(limiter, gil_bound, 2.0, 100.0)
    assert min(seen) == 2


def test_kept_is_the_limit_a_probe_is_tried_against() -> None:
    limiter = AdaptiveLimit(1, 16)
    now = 0.0
    while limiter.limit == 16:
        now += 0.001
        limiter.ended(now)
    assert (limiter.limit, limiter.kept) == (8, 16)


def test_kept_is_a_step_down_only_once_confirmed() -> None:
    limiter = AdaptiveLimit(1, 16)
    now, kept = 0.0, []
    while now < 5.0:
        now += 1.0 / gil_bound(limiter.limit)
        limiter.ended(now)
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
        if limiter.ended(now):
            changes.append((before, limiter.limit))
        else:
            assert limiter.limit == before
    assert changes and all(a != b for a, b in changes)
