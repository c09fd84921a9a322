"""Helpers shared by the pool tests."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any


def unique_app() -> str:
    """An application_name no other test uses, to find this test's backends."""
    return f"pgw-test-{uuid.uuid4().hex[:10]}"


def backend_pids(admin: Any, application_name: str | None) -> list[int]:
    """Client backends of the admin connection's database, maybe of one app only."""
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND backend_type = 'client backend'"
        " AND pid <> pg_backend_pid()"
        " AND (%(app)s::text IS NULL OR application_name = %(app)s)",
        {"app": application_name},
    ).fetchall()
    return [r[0] for r in rows]


def free_port() -> int:
    """A TCP port on 127.0.0.1 where nothing listens (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_all(funcs: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables in threads; return their results, raise the first error."""
    results: list[Any] = [None] * len(funcs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = funcs[i]()
        except BaseException as ex:
            errors.append(ex)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(funcs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def socket_of(reader: Any) -> tuple[int, int]:
    """A `Reader`'s registered duplicate: its number and the socket's inode."""
    fd: int = reader._fd
    return fd, os.fstat(fd).st_ino


def closed(fd: int, inode: int) -> bool:
    """Whether `fd` no longer refers to that socket (closed, or reused)."""
    try:
        return os.fstat(fd).st_ino != inode
    except OSError:
        return True
