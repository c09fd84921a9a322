"""Setting values in PostgreSQL's units: time, memory, plain counts.

`pg_settings` reports an integer in the setting's own unit (``ms``, ``s``,
``kB``, ``8kB``...); these helpers convert, parse and print such values.
"""

from __future__ import annotations

import os
import re
from typing import Final

__all__ = [
    "local_memory",
    "parse_memory",
    "parse_value",
    "setting_text",
    "size_text",
    "to_base",
]

_TIME_MS: Final = {"d": 86_400_000, "h": 3_600_000, "min": 60_000, "s": 1000, "ms": 1}
_MEMORY_BYTES: Final = {"TB": 1024**4, "GB": 1024**3, "MB": 1024**2, "kB": 1024, "B": 1}
_UNIT = re.compile(r"([0-9]*)(B|kB|MB|GB|TB|us|ms|s|min|h|d)")
_VALUE = re.compile(
    r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*(\w*)"
)
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([kmgt])i?b?|(b))", re.I)
_LOOPBACK: Final = frozenset({"localhost", "::1"})


def _scale(unit: str | None) -> tuple[str, float]:
    """("count", 1), ("time", milliseconds per unit) or ("memory", bytes per unit)."""
    if unit is None or unit == "":
        return "count", 1
    match = _UNIT.fullmatch(unit)
    if match is None:
        raise ValueError(f"unknown unit {unit!r}")
    count = int(match[1] or 1)
    if match[2] in _MEMORY_BYTES:
        return "memory", count * _MEMORY_BYTES[match[2]]
    return "time", count * (0.001 if match[2] == "us" else _TIME_MS[match[2]])


def to_base(value: int, unit: str | None) -> tuple[str, float]:
    """The kind of a value and its size in base units: ms for time, bytes for memory.

    ``to_base(16384, "8kB")`` is ``("memory", 134217728)``.
    """
    kind, factor = _scale(unit)
    return kind, value * factor


def parse_value(text: str, unit: str | None) -> int | None:
    """A value as written in postgresql.conf, in `unit`; None if unreadable.

    ``parse_value("5min", "ms")`` is 300000, ``parse_value("128MB", "8kB")``
    16384; a number without a unit is already in `unit`, as PostgreSQL reads it.
    """
    match = _VALUE.fullmatch(text.strip())
    if match is None:
        return None
    number = float(match[1])
    if not match[2]:
        return round(number)
    try:
        kind, factor = _scale(unit)
        given_kind, given = _scale(match[2])
    except ValueError:
        return None
    return round(number * given / factor) if kind == given_kind else None


def setting_text(value: int, unit: str | None) -> str:
    """A value as postgresql.conf and ALTER SYSTEM accept it: ``5min``, ``128MB``.

    The largest unit that divides the value exactly is used.
    """
    kind, base = to_base(value, unit)
    if kind == "count" or value == 0:
        return str(value)
    units = _TIME_MS if kind == "time" else _MEMORY_BYTES
    for name, size in units.items():
        if base % size == 0:
            return f"{int(base // size)}{name}"
    return f"{value}{unit}"


def size_text(size: float) -> str:
    """Bytes for reading (``560MB``, ``1.5GB``), rounded."""
    for name, unit in _MEMORY_BYTES.items():
        if size >= unit:
            return f"{size / unit:.1f}".removesuffix(".0") + name
    return f"{size:.0f}B"


def parse_memory(text: str) -> int:
    """A memory size such as ``8GB``, ``512MB``, ``16G`` or ``1.5 GiB``, in bytes.

    Units are powers of 1024, as in PostgreSQL. Raises ValueError otherwise.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a memory size; expected e.g. 8GB or 512MB")
    exponent = "bkmgt".index((match[2] or match[3]).lower())
    size = round(float(match[1]) * (1 << 10 * exponent))
    if size <= 0:
        raise ValueError(f"{text!r} is not a memory size; expected more than 0")
    return size


def local_memory(host: str | None) -> int | None:
    """This machine's memory in bytes when `host` is this machine, else None.

    The server's memory is not visible through SQL. When it runs on this
    machine (a Unix socket, ``localhost`` or a loopback address) this
    machine's memory is taken for it, assuming the server is not confined to
    less (a container's memory limit is not seen).
    """
    local = host is not None and (
        host == "" or host.startswith(("/", "@", "127.")) or host.lower() in _LOOPBACK
    )
    if not local:
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf here (Windows)
        return None
