"""The texts the pool writes in errors and logs: timeouts, leaks, reclaims.

Built only on slow paths (a timeout, a maintenance step), never when borrowing.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
import traceback
import types
from typing import Any

from ._core import FAST_FAIL_WAIT, Entry, Lane, PoolCore

# How many of the longest-held connections a timeout message lists.
HELD_SHOWN = 3


def where(entry: Entry) -> str:
    """`file:line in function` of the code that borrowed `entry`."""
    if entry.site is None:
        return "an unknown place"
    code, offset = entry.site
    line = _line(code, offset)
    filename = code.co_filename
    try:
        rel = os.path.relpath(filename)
        if not rel.startswith(".."):
            filename = rel
    except ValueError:  # another drive on Windows
        pass
    return f"{filename}:{line} in {code.co_name}"


@functools.lru_cache(maxsize=256)
def _line(code: types.CodeType, offset: int) -> int:
    """The line of the instruction at byte `offset` in `code`."""
    return next(
        (n for start, end, n in code.co_lines() if start <= offset < end and n),
        code.co_firstlineno,
    )


def holder_name(holder: Any) -> str:
    """The borrowing thread's or task's name."""
    if isinstance(holder, asyncio.Task):
        return f"task {holder.get_name()!r}"
    for t in threading.enumerate():
        if t.ident == holder:
            return f"thread {t.name!r}"
    return "a thread that has ended" if holder is not None else "an unknown borrower"


def holder_stack(holder: Any) -> str:
    """Where the borrowing thread or task is now, as a formatted stack."""
    if isinstance(holder, asyncio.Task):
        frames = holder.get_stack()
        if not frames:
            return "  (the task has finished)\n"
        return "".join(traceback.format_list(_summaries(frames)))
    frame = sys._current_frames().get(holder) if holder is not None else None
    if frame is None:
        return "  (the thread has ended)\n"
    return "".join(traceback.format_stack(frame))


def _summaries(frames: list[Any]) -> traceback.StackSummary:
    return traceback.StackSummary.extract((f, f.f_lineno) for f in frames)


def held_line(entry: Entry, now: float) -> str:
    lane = entry.lane.name if entry.lane is not None else "?"
    return f"{now - entry.held_since:.1f} s (lane {lane!r}, acquired at {where(entry)})"


def timeout_message(
    core: PoolCore, pool: str, lane: Lane, waited: float, now: float
) -> str:
    """Why a caller gets no connection: usage, waiters, culprits, last error."""
    parts = [
        f"no connection from pool {pool!r} (lane {lane.name!r}) after {waited:.2f} s:"
        f" {core.busy} of {core.max_size} in use, {core.n_waiting} other callers"
        f" waiting"
    ]
    if lane.in_use >= lane.limit:
        parts.append(f"lane {lane.name!r} is at its limit of {lane.limit}")
    elif lane.in_use >= lane.reserved and core.committed >= core.max_size:
        others = [
            f"{other.name} {other.reserved}"
            for other in core.lanes.values()
            if other is not lane and other.reserved > other.in_use
        ]
        parts.append(
            "no room is left outside the reservations of other lanes"
            + (f" ({', '.join(others)} reserved)" if others else "")
        )
    elif lane.in_use >= lane.reserved and core.committed >= core.cap:
        parts.append(
            f"adaptive_concurrency lends at most {core.cap} at once"
            " (measured faster than more)"
        )
    held = core.held(now)[:HELD_SHOWN]
    if held:
        parts.append("held longest: " + "; ".join(held_line(e, now) for e in held))
    if core._invalid_streak:
        parts.append(
            f"the last {core._invalid_streak} validation queries failed"
            f" ({core.last_validation_error or 'no error text'})"
        )
    if core.down:
        parts.append(
            f"the server is unreachable (callers give up after {FAST_FAIL_WAIT:g} s)"
        )
    if core.last_error and now - core.last_error_at < 60.0:
        parts.append(f"last connection error: {core.last_error}")
    return "; ".join(parts)


def leak_message(entry: Entry, pool: str, threshold: float, now: float) -> str:
    return (
        f"possible connection leak in pool {pool!r}: connection (backend pid"
        f" {entry.pid}) held for {now - entry.held_since:.1f} s, over"
        f" leak_detection_threshold={threshold:g} s, by {holder_name(entry.holder)}"
        f" (lane {entry.lane.name if entry.lane else '?'!r}), acquired at"
        f" {where(entry)}. The holder is now at:\n{holder_stack(entry.holder)}"
    )


def unleak_message(entry: Entry, pool: str, now: float) -> str:
    return (
        f"connection (backend pid {entry.pid}) reported as a possible leak in pool"
        f" {pool!r} was given back after {now - entry.held_since:.1f} s; it was"
        f" acquired at {where(entry)}"
    )


def reclaim_message(entry: Entry, pool: str, now: float) -> str:
    return (
        f"connection (backend pid {entry.pid}) of pool {pool!r} was garbage"
        f" collected without being given back, {now - entry.held_since:.1f} s after"
        f" it was acquired at {where(entry)} by {holder_name(entry.holder)}; the pool"
        f" closed it (the server rolls back its open transaction) and will replace it"
    )


def stranded_message(entry: Entry, pool: str, now: float) -> str:
    since = max(entry.held_since, entry.returned_at)
    step = "given back" if entry.returned_at >= entry.held_since else "lent"
    return (
        f"connection (backend pid {entry.pid}) of pool {pool!r} was left"
        f" between hands for {now - since:.0f} s: it was being {step} (acquired at"
        f" {where(entry)} by {holder_name(entry.holder)}) when that was stopped"
        " halfway, by a KeyboardInterrupt for instance; the pool dropped it"
        " (the server rolls back its open transaction) and will replace it"
    )
