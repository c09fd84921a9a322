"""Who used the CPUs during a measurement: us, the server, everyone else.

Client and server share the machine's cores with whatever else runs there;
a test suite started by someone else halves the throughput. Reading
``/proc`` before and after a measurement tells how many cores the rest of the
machine kept busy, so that such a measurement can be spotted, not averaged in.

Linux only; elsewhere, and for a server on another host, the numbers are None.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuMeter",
    "CpuUse",
    "mean_use",
    "others_load",
    "server_pid_of_backend",
    "wait_until_quiet",
]

_PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuUse:
    """Average cores busy during an interval, split by who kept them busy."""

    seconds: float  # the interval
    total: float
    client: float  # this process
    server: float | None  # the PostgreSQL server, if it runs here
    other: float | None  # everything else


def _busy_ticks() -> int | None:
    """Ticks all CPUs spent busy since boot (steal excluded)."""
    try:
        fields = (_PROC / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
    return user + nice + system + irq + softirq


def _process_ticks(pid: int | str, children: bool = False) -> int:
    """utime + stime of a process (plus its reaped children's), 0 if gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name
    # fields[0] is the state (field 3): utime is field 14, cstime field 17.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def _ppid(pid: int | str) -> int | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def server_pid_of_backend(backend_pid: int) -> int | None:
    """The postmaster's pid, if the backend `backend_pid` runs on this machine."""
    try:
        comm = (_PROC / str(backend_pid) / "comm").read_text().strip()
    except OSError:
        return None
    if not comm.startswith("postgres"):
        return None  # another process with that pid: the server is elsewhere
    return _ppid(backend_pid)


def _server_ticks(postmaster: int) -> int:
    """The postmaster's ticks, its reaped children's and its live children's."""
    ticks = _process_ticks(postmaster, children=True)
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and _ppid(entry.name) == postmaster:
            ticks += _process_ticks(entry.name)
    return ticks


_Reading = tuple[float, int | None, int, int | None]


class CpuMeter:
    """Call `start()` then `stop()`; `stop` returns the `CpuUse` in between.

    `server_pid` is the local postmaster (None: the server runs elsewhere).
    """

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self._start: _Reading | None = None

    def _read(self) -> _Reading:
        pid = self.server_pid
        server = None if pid is None else _server_ticks(pid)
        return time.perf_counter(), _busy_ticks(), _process_ticks("self"), server

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> CpuUse | None:
        if self._start is None:
            return None
        (t0, busy0, self0, server0), (t1, busy1, self1, server1) = (
            self._start,
            self._read(),
        )
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        scale = 1.0 / (_TICK * (t1 - t0))
        total = (busy1 - busy0) * scale
        client = (self1 - self0) * scale
        if server0 is None or server1 is None:
            return CpuUse(t1 - t0, total, client, None, None)
        server = (server1 - server0) * scale
        other = max(total - client - server, 0.0)
        return CpuUse(t1 - t0, total, client, server, other)


def mean_use(uses: Sequence[CpuUse]) -> CpuUse | None:
    """The average of several intervals' `CpuUse`, weighted by their length."""
    seconds = sum(u.seconds for u in uses)
    if seconds <= 0:
        return None

    def mean(name: str) -> float | None:
        values: list[float | None] = [getattr(u, name) for u in uses]
        weights = [u.seconds for u in uses]
        if any(v is None for v in values):
            return None
        pairs = zip(values, weights, strict=True)
        return sum((v or 0.0) * w for v, w in pairs) / seconds

    return CpuUse(
        seconds,
        mean("total") or 0.0,
        mean("client") or 0.0,
        mean("server"),
        mean("other"),
    )


def others_load(use: CpuUse) -> float:
    """Cores used by others; without a local server, everything but us."""
    return use.other if use.other is not None else max(use.total - use.client, 0.0)


def wait_until_quiet(
    server_pid: int | None,
    max_load: float,
    timeout: float,
    on_wait: Callable[[float], None] | None = None,
) -> float | None:
    """Wait until other processes use at most `max_load` cores, `timeout` at most.

    Return the last load seen (None if it can't be measured here). `on_wait`
    is called with the load once, when a wait begins.
    """
    deadline = time.monotonic() + timeout
    meter = CpuMeter(server_pid)
    announced = False
    while True:
        meter.start()
        time.sleep(0.3)
        use = meter.stop()
        if use is None:
            return None
        load = others_load(use)
        if load <= max_load or time.monotonic() >= deadline:
            return load
        if on_wait is not None and not announced:
            on_wait(load)
            announced = True
