"""Measure the implementations of one kind on one cell, interleaved in slices.

A *round* opens every implementation of one kind (threads or asyncio) for a
cell, then gives each in turn a short *slice* of work, ``Timing.slices``
slices each, in an order rotated by one place per slice. A machine whose
speed changes for a few seconds at a time (virtual machines do that, and
other people's processes) thus slows every implementation alike. Each
implementation's slices add up to one `Sample`.

In a slice every worker runs the same loop until a shared deadline::

    t0 = clock()
    with impl.connection(worker) as conn:
        t1 = clock()              # t1 - t0: the acquire wait
        op(conn, rng)
    t2 = clock()                  # the operation is complete

Operations completing inside the slice's window (after its warm-up, before
its end) are counted, with their acquire waits. The loop costs three clock
reads and one list append per operation: a few hundred nanoseconds, which is
what `direct` shows on the `acquire` cell. Workers stop on their own at the
deadline, so an async worker that never yields still stops; they also read
the process CPU time at their first counted and at their last operation.
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from impls_base import AsyncImpl, SyncImpl
from metrics import jain, starved
from system import CpuMeter, CpuUse, mean_use, others_load
from workloads import Cell

__all__ = ["Quiet", "Sample", "Timing", "measure_round"]

_clock = time.perf_counter
_cpu_clock = time.process_time

Impl = type[SyncImpl] | type[AsyncImpl]


@dataclass(frozen=True)
class Timing:
    """How a round spends its time."""

    warmup: float  # before an implementation's first slice
    duration: float  # measured per implementation, over all its slices
    slices: int = 5
    slice_warmup: float = 0.1  # before each later slice
    hang_grace: float = 30.0  # past a slice's end: the workers hang

    @property
    def slice_duration(self) -> float:
        return self.duration / self.slices


@dataclass(frozen=True)
class Quiet:
    """When a slice is spoiled by other processes, and what to do about it."""

    server_pid: int | None = None  # the local postmaster, to tell its CPU apart
    max_other_load: float = math.inf  # cores the others may use
    retries: int = 0  # times a spoiled slice is measured again


@dataclass
class Sample:
    """One implementation on one cell in one round: the sum of its slices."""

    cell: str
    kind: str
    impl: str
    rep: int
    position: int  # the implementation's place in the round's first order
    connections: int
    reference: bool  # the ratio reference of its kind (direct)
    slices: int = 0
    retried: int = 0  # slices measured again, others having used the CPUs
    duration: float = 0.0  # measured seconds, over all slices
    ops: int = 0
    cpu_seconds: float = 0.0
    worker_ops: list[int] = field(default_factory=list)
    # Acquire waits, seconds: p50, p90, p99, p99.9 (within 2.5%), max, mean.
    waits: dict[str, float] = field(default_factory=dict)
    cores: CpuUse | None = None  # the slices' CPU use, warm-ups included
    error: str | None = None

    @property
    def throughput(self) -> float:
        return self.ops / self.duration if self.duration else 0.0

    @property
    def cpu_per_op(self) -> float:
        return self.cpu_seconds / self.ops if self.ops else 0.0

    @property
    def jain(self) -> float | None:
        """Jain's fairness index over the workers' completions (metrics.py)."""
        return jain(self.worker_ops)

    @property
    def starved(self) -> int:
        """Workers that completed under 10% of the mean (metrics.py)."""
        return starved(self.worker_ops)


# -- bookkeeping ------------------------------------------------------------


@dataclass(frozen=True)
class _Window:
    start: float  # the end of the warm-up
    end: float

    @classmethod
    def after(cls, warmup: float, duration: float) -> _Window:
        start = _clock() + warmup
        return cls(start, start + duration)


@dataclass
class _WorkerResult:
    ops: int = 0
    waits: list[float] = field(default_factory=list)
    # (clock, process CPU time) at the first counted op and at the stop.
    first: tuple[float, float] | None = None
    last: tuple[float, float] | None = None
    error: str | None = None


class _Hang(Exception):
    """Workers still ran `hang_grace` seconds after their deadline."""


class _Waits:
    """A histogram of waits in buckets 5% wide: mergeable, and small."""

    _MIN = 1e-8
    _LOG_BASE = math.log(1.05)

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.n = 0
        self.total = 0.0
        self.max = 0.0

    def _bucket(self, seconds: float) -> int:
        if seconds <= self._MIN:
            return 0
        return int(math.log(seconds / self._MIN) / self._LOG_BASE) + 1

    def add(self, waits: Sequence[float]) -> None:
        if not waits:
            return
        self.counts.update(map(self._bucket, waits))
        self.n += len(waits)
        self.total += math.fsum(waits)
        self.max = max(self.max, max(waits))

    def quantile(self, q: float) -> float:
        """The `q` quantile, as the middle of its bucket (0.0 when empty)."""
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                if bucket == 0:
                    return self._MIN
                mid = self._MIN * math.exp((bucket - 0.5) * self._LOG_BASE)
                return min(mid, self.max)
        return self.max

    def summary(self) -> dict[str, float]:
        return {
            "p50": self.quantile(0.50),
            "p90": self.quantile(0.90),
            "p99": self.quantile(0.99),
            "p99.9": self.quantile(0.999),
            "max": self.max,
            "mean": self.total / self.n if self.n else 0.0,
        }


def _window_cpu(window: _Window, results: Sequence[_WorkerResult]) -> float:
    """The process CPU seconds spent during the window, from the workers' reads.

    A helper thread could not read it in time: it would wait for the GIL.
    """
    firsts = [r.first for r in results if r.first]
    lasts = [r.last for r in results if r.last]
    if not firsts or not lasts:
        return 0.0
    (t0, cpu0), (t1, cpu1) = min(firsts), max(lasts)
    if t1 <= t0:
        return 0.0
    return (cpu1 - cpu0) * (window.end - window.start) / (t1 - t0)


class _Tally:
    """What an implementation's slices add up to, so far."""

    def __init__(self, workers: int) -> None:
        self.worker_ops = [0] * workers
        self.waits = _Waits()
        self.duration = 0.0
        self.cpu = 0.0
        self.uses: list[CpuUse] = []
        self.slices = 0
        self.retried = 0
        self.error: str | None = None
        self.hung = False

    def add(
        self, window: _Window, results: Sequence[_WorkerResult], use: CpuUse | None
    ) -> None:
        for i, result in enumerate(results):
            self.worker_ops[i] += result.ops
            self.waits.add(result.waits)
        self.duration += window.end - window.start
        self.cpu += _window_cpu(window, results)
        if use is not None:
            self.uses.append(use)
        self.slices += 1

    def fail(self, what: str) -> None:
        """Record the exception being handled (after any earlier error)."""
        message = f"{what}:\n{traceback.format_exc()}"
        self.error = f"{self.error}\n{message}" if self.error else message

    def sample(self, impl: Impl, cell: Cell, rep: int, position: int) -> Sample:
        return Sample(
            cell=cell.id,
            kind=impl.kind,
            impl=impl.name,
            rep=rep,
            position=position,
            connections=impl.connections(size=cell.pool_size, workers=cell.workers),
            reference=impl.reference,
            slices=self.slices,
            retried=self.retried,
            duration=self.duration,
            ops=sum(self.worker_ops),
            cpu_seconds=self.cpu,
            worker_ops=self.worker_ops,
            waits=self.waits.summary(),
            cores=mean_use(self.uses),
            error=self.error,
        )


def _rngs(seed: int, index: int, workers: int) -> list[random.Random]:
    return [random.Random((seed * 1009 + index) * 1009 + i) for i in range(workers)]


# -- threads ----------------------------------------------------------------


def _thread_worker(
    impl: SyncImpl,
    worker: int,
    op: Callable[[Any, random.Random], None],
    rng: random.Random,
    window: _Window,
    out: _WorkerResult,
) -> None:
    connection = impl.connection
    append = out.waits.append
    start, end = window.start, window.end
    ops = 0
    try:
        while True:
            t0 = _clock()
            with connection(worker) as conn:
                t1 = _clock()
                op(conn, rng)
            t2 = _clock()
            if t2 >= start:
                if t2 >= end:
                    out.last = (t2, _cpu_clock())
                    break
                if not ops:
                    out.first = (t2, _cpu_clock())
                append(t1 - t0)
                ops += 1
    except Exception:
        out.error = traceback.format_exc()
    out.ops = ops


class _Threads:
    """Runs the slices of sync implementations, one thread per worker."""

    def create(self, impl_cls: Impl, dsn: str, cell: Cell) -> Any:
        return impl_cls(dsn, size=cell.pool_size, workers=cell.workers)

    def open(self, impl: SyncImpl) -> None:
        impl.open()

    def close(self, impl: SyncImpl) -> None:
        impl.close()

    def run(
        self,
        impl: SyncImpl,
        op: Any,
        rngs: Sequence[random.Random],
        window: _Window,
        grace: float,
    ) -> list[_WorkerResult]:
        results = [_WorkerResult() for _ in rngs]
        threads = [
            threading.Thread(
                target=_thread_worker,
                args=(impl, i, op, rng, window, results[i]),
                name=f"bench-worker-{i}",
                daemon=True,
            )
            for i, rng in enumerate(rngs)
        ]
        for thread in threads:
            thread.start()
        give_up = window.end + grace
        for thread in threads:
            thread.join(max(give_up - _clock(), 0.0))
        if hung := [t for t in threads if t.is_alive()]:
            raise _Hang(_thread_stacks(hung, grace))
        return results

    def finish(self) -> None:
        pass


def _thread_stacks(hung: Sequence[threading.Thread], grace: float) -> str:
    frames = sys._current_frames()
    lines = [f"hang: {len(hung)} worker thread(s) still running {grace:g} s late"]
    for thread in hung[:3]:
        frame = frames.get(thread.ident or 0)
        stack = "".join(traceback.format_stack(frame)) if frame else "?\n"
        lines.append(f"--- {thread.name}:\n{stack}")
    return "\n".join(lines)


# -- asyncio ----------------------------------------------------------------


async def _task_worker(
    impl: AsyncImpl,
    worker: int,
    op: Callable[[Any, random.Random], Any],
    rng: random.Random,
    window: _Window,
    out: _WorkerResult,
) -> None:
    connection = impl.connection
    append = out.waits.append
    start, end = window.start, window.end
    ops = 0
    try:
        while True:
            t0 = _clock()
            async with connection(worker) as conn:
                t1 = _clock()
                await op(conn, rng)
            t2 = _clock()
            if t2 >= start:
                if t2 >= end:
                    out.last = (t2, _cpu_clock())
                    break
                if not ops:
                    out.first = (t2, _cpu_clock())
                append(t1 - t0)
                ops += 1
    except Exception:
        out.error = traceback.format_exc()
    out.ops = ops


async def _create_async(impl_cls: Impl, dsn: str, cell: Cell) -> Any:
    return impl_cls(dsn, size=cell.pool_size, workers=cell.workers)


async def _run_tasks(
    impl: AsyncImpl,
    op: Any,
    rngs: Sequence[random.Random],
    window: _Window,
    grace: float,
) -> list[_WorkerResult]:
    results = [_WorkerResult() for _ in rngs]
    tasks = [
        asyncio.create_task(
            _task_worker(impl, i, op, rng, window, results[i]),
            name=f"bench-worker-{i}",
        )
        for i, rng in enumerate(rngs)
    ]
    give_up = window.end + grace
    _, pending = await asyncio.wait(tasks, timeout=max(give_up - _clock(), 0.0))
    if pending:
        stacks = _task_stacks(pending, grace)
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
        raise _Hang(stacks)
    return results


def _task_stacks(hung: set[asyncio.Task[None]], grace: float) -> str:
    lines = [f"hang: {len(hung)} worker task(s) still running {grace:g} s late"]
    for task in list(hung)[:3]:
        frames = [(frame, frame.f_lineno) for frame in task.get_stack()]
        stack = traceback.StackSummary.extract(iter(frames)).format()
        lines.append(f"--- {task.get_name()}:\n{''.join(stack)}")
    return "\n".join(lines)


class _Tasks:
    """Runs the slices of async implementations, one task per worker.

    One event loop serves the whole round; it runs only during the calls.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def create(self, impl_cls: Impl, dsn: str, cell: Cell) -> Any:
        # In the loop: some pools want one at construction.
        return self.loop.run_until_complete(_create_async(impl_cls, dsn, cell))

    def open(self, impl: AsyncImpl) -> None:
        self.loop.run_until_complete(impl.open())

    def close(self, impl: AsyncImpl) -> None:
        self.loop.run_until_complete(impl.close())

    def run(
        self,
        impl: AsyncImpl,
        op: Any,
        rngs: Sequence[random.Random],
        window: _Window,
        grace: float,
    ) -> list[_WorkerResult]:
        return self.loop.run_until_complete(_run_tasks(impl, op, rngs, window, grace))

    def finish(self) -> None:
        try:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()


class _Driver(Protocol):
    def create(self, impl_cls: Impl, dsn: str, cell: Cell) -> Any: ...
    def open(self, impl: Any) -> None: ...
    def close(self, impl: Any) -> None: ...
    def run(
        self,
        impl: Any,
        op: Any,
        rngs: Sequence[random.Random],
        window: _Window,
        grace: float,
    ) -> list[_WorkerResult]: ...
    def finish(self) -> None: ...


# -- a round ----------------------------------------------------------------


def _slice(
    driver: _Driver,
    impl: Any,
    op: Any,
    rngs: Sequence[random.Random],
    warmup: float,
    timing: Timing,
    quiet: Quiet,
    tally: _Tally,
) -> float | None:
    """Run one slice into `tally`; return the others' load if it was retried."""
    meter = CpuMeter(quiet.server_pid)
    retried_load = None
    for attempt in range(quiet.retries + 1):
        gc.collect()
        meter.start()
        window = _Window.after(warmup, timing.slice_duration)
        try:
            results = driver.run(impl, op, rngs, window, timing.hang_grace)
        except _Hang as hang:
            tally.error, tally.hung = str(hang), True
            return retried_load
        use = meter.stop()
        if errors := [r.error for r in results if r.error]:
            tally.error = f"{len(errors)} worker(s) failed; the first:\n{errors[0]}"
            return retried_load
        load = others_load(use) if use else 0.0
        if load <= quiet.max_other_load or attempt == quiet.retries:
            tally.add(window, results, use)
            return retried_load
        tally.retried += 1
        retried_load = load
    return retried_load


def measure_round(
    impls: Sequence[Impl],
    cell: Cell,
    dsn: str,
    timing: Timing,
    *,
    rep: int,
    seed: int,
    quiet: Quiet | None = None,
    on_retry: Callable[[str, float], None] | None = None,
) -> list[Sample]:
    """Measure `impls` (all of one kind) on `cell`, interleaved; one sample each.

    They are all opened first, then each gets `timing.slices` slices, in the
    given order rotated by one place per slice, and they are closed. A
    failure (in creating, opening or closing one, in a worker, or a hang)
    does not raise: the implementation's sample reports it in `error`, with a
    traceback, and the others go on. A slice during which other processes
    used more than `quiet.max_other_load` cores is measured again, up to
    `quiet.retries` times; `on_retry(name, load)` is told.
    """
    quiet = quiet or Quiet()
    kind = impls[0].kind
    driver: _Driver = _Threads() if kind == "sync" else _Tasks()
    tallies = [_Tally(cell.workers) for _ in impls]
    opened: dict[int, Any] = {}
    try:
        for i, impl_cls in enumerate(impls):
            try:
                opened[i] = driver.create(impl_cls, dsn, cell)
                driver.open(opened[i])
            except Exception:
                tallies[i].fail(f"opening {impl_cls.name} failed")
        for index in range(timing.slices):
            rngs = _rngs(seed, index, cell.workers)
            warmup = timing.warmup if index == 0 else timing.slice_warmup
            shift = index % len(impls)
            for i in [*range(shift, len(impls)), *range(shift)]:
                if tallies[i].error:
                    continue
                op = cell.workload.op(kind, impls[i].driver)
                load = _slice(
                    driver, opened[i], op, rngs, warmup, timing, quiet, tallies[i]
                )
                if load is not None and on_retry is not None:
                    on_retry(impls[i].name, load)
    finally:
        for i, impl in opened.items():
            if not tallies[i].hung:  # closing a hung one could hang too
                try:
                    driver.close(impl)
                except Exception:
                    tallies[i].fail(f"closing {impls[i].name} failed")
        driver.finish()
    return [
        tally.sample(impl_cls, cell, rep, position)
        for position, (impl_cls, tally) in enumerate(zip(impls, tallies, strict=True))
    ]
