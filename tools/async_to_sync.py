#!/usr/bin/env python3
"""Generate the thread-based pool from the asyncio one.

    python tools/async_to_sync.py          # rewrite the generated files
    python tools/async_to_sync.py --check  # fail if any is out of date (CI)

Each `*_async.py` source listed in `SOURCES` becomes its sync twin:
`async`/`await` are dropped, names are renamed through `NAMES`, and a block

    if True:  # ASYNC
        <asyncio code>
    else:
        <thread code>

keeps only its `else` branch (or nothing, without one). The output is then
formatted with ruff, so the check is exact. Every entry of `NAMES` must be used
at least once, which keeps the table honest.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POOL = ROOT / "src" / "pgwarden" / "pool"
TESTS = ROOT / "tests" / "pool"
FAULTS = ROOT / "tests" / "faults"
SOURCES = {
    POOL / "pool_async.py": POOL / "pool.py",
    POOL / "connection_async.py": POOL / "connection.py",
    TESTS / "test_pool_async.py": TESTS / "test_pool.py",
    FAULTS / "test_server_async.py": FAULTS / "test_server.py",
    FAULTS / "test_network_async.py": FAULTS / "test_network.py",
    FAULTS / "test_lifecycle_async.py": FAULTS / "test_lifecycle.py",
}

# Whole-word renames, applied in order.
NAMES = {
    "AsyncPooledConnection": "PooledConnection",
    "AsyncReturnedConnection": "ReturnedConnection",
    "_AsyncConnectionBlock": "_ConnectionBlock",
    "AsyncConnection": "Connection",
    "AsyncCursor": "Cursor",
    "AsyncServerCursor": "ServerCursor",
    "AsyncPool": "Pool",
    "AWaiter": "Waiter",
    "AEvent": "Event",
    "aspawn": "spawn",
    "aprepare": "prepare",
    "agather": "gather",
    "acurrent_holder": "current_holder",
    "await_until": "wait_until",
    "acheck_pool": "check_pool",
    "acheck_closed": "check_closed",
    "connection_async": "connection",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
}

# Other substitutions (regex, replacement), applied before NAMES.
SUBS = [
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"for asyncio\b", "for threads"),
    (r"\(asyncio\)", "(threads)"),
]

HEADER = """\
# WARNING: generated from {source} by tools/async_to_sync.py.
# DO NOT CHANGE THIS FILE: change {source} and run the tool.
"""

_IF_ASYNC = re.compile(r"^(?P<indent>\s*)if True:\s+# ASYNC\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def resolve_branches(lines: list[str]) -> list[str]:
    """Replace each `if True:  # ASYNC` block with its dedented `else` branch."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _IF_ASYNC.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        level = len(m["indent"])
        i += 1
        # Skip the async body: blank lines or lines indented deeper.
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > level):
            i += 1
        if (
            i < len(lines)
            and _indent(lines[i]) == level
            and lines[i].strip() == "else:"
        ):
            i += 1
            while i < len(lines) and (
                not lines[i].strip() or _indent(lines[i]) > level
            ):
                line = lines[i]
                out.append(line[4:] if line.strip() else line)
                i += 1
    return out


def convert(source: Path) -> str:
    text = source.read_text()
    text = "".join(resolve_branches(text.splitlines(keepends=True)))
    for pattern, repl in SUBS:
        text = re.sub(pattern, repl, text)
    for old, new in NAMES.items():
        text, n = re.subn(rf"\b{re.escape(old)}\b", new, text)
        _used[old] = _used.get(old, 0) + n
    text = HEADER.format(source=source.name) + text
    return _ruff(text, source.with_name(source.name.replace("_async", "")))


def _ruff(text: str, path: Path) -> str:
    ruff = [sys.executable, "-m", "ruff"]
    name = ["--stdin-filename", str(path)]
    fixed = subprocess.run(
        [*ruff, "check", "--fix-only", "--select", "I,F401", "--quiet", *name, "-"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return subprocess.run(
        [*ruff, "format", *name, "-"],
        input=fixed,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout


_used: dict[str, int] = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, don't write")
    args = parser.parse_args()
    stale = []
    for source, target in SOURCES.items():
        text = convert(source)
        if target.exists() and target.read_text() == text:
            continue
        if args.check:
            stale.append(target)
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(ROOT)}")
    unused = [name for name in NAMES if not _used.get(name)]
    if unused:
        print(f"unused names in NAMES: {', '.join(unused)}", file=sys.stderr)
        return 1
    if stale:
        for target in stale:
            print(f"{target.relative_to(ROOT)} is out of date: run {__file__}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
