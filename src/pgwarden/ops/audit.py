"""The audit log: one JSON line for every change a command makes.

Terminations, cancellations and settings changes are appended to the file
given with `--audit-log`, one self-contained JSON object per line, so that
`jq` or a log shipper can read it. Nothing is written for a dry run.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class AuditLog:
    """Appends audit records to `path`; with `path` None, records nothing.

    Each line has `at` (ISO 8601 UTC), `action`, `os_user`, `host`, then the
    fields given to `record()`.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    def __bool__(self) -> bool:
        return self.path is not None

    def record(self, action: str, **fields: Any) -> None:
        """Append one record; the line is flushed to disk before returning."""
        if self.path is None:
            return
        entry = {
            "at": datetime.now(UTC).isoformat(),
            "action": action,
            "os_user": _os_user(),
            "host": socket.gethostname(),
            **fields,
        }
        line = json.dumps(entry, default=str, separators=(",", ":")) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name for this uid (containers)
        return str(os.getuid())
