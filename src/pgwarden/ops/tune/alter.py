"""Changing the settings: `apply` sets recommendations with ALTER SYSTEM, reloads."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from pgwarden.errors import PgwardenError

from .._units import setting_text
from ..audit import AuditLog
from .rules import Recommendation
from .settings import ServerSettings

__all__ = [
    "Applied",
    "ApplyFailed",
    "ApplyRefused",
    "alter_statements",
    "apply",
    "apply_refusal",
]

_SETTLE_SECONDS: Final = 5.0


class ApplyRefused(PgwardenError):
    """This role may not change the settings with ALTER SYSTEM: nothing was changed."""

    __module__ = "pgwarden"


class ApplyFailed(PgwardenError):
    """An ALTER SYSTEM failed; the message says what was put back."""

    __module__ = "pgwarden"


@dataclass(frozen=True, slots=True)
class Applied:
    """A setting `apply` changed: `live` now, or `pending_restart`.

    Neither means the change is written but this session did not see it
    take effect within a few seconds.
    """

    name: str
    value: int
    unit: str | None
    live: bool
    pending_restart: bool

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON fields (docs/tune.md)."""
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "live": self.live,
            "pending_restart": self.pending_restart,
        }


def apply_refusal(
    server: ServerSettings, changes: Iterable[Recommendation]
) -> str | None:
    """Why this role may not make `changes` with ALTER SYSTEM, or None if it may."""
    if not server.alter_system_enabled:
        return (
            "ALTER SYSTEM is disabled on this server (allow_alter_system = off),"
            " as on managed services"
        )
    denied = [
        rec.name
        for rec in changes
        if rec.is_change and not server.settings[rec.name].may_alter
    ]
    if not denied:
        if not server.may_reload:
            return (
                f"role {server.role!r} may not call pg_reload_conf(): the changes"
                " would be written but not loaded"
                " (GRANT EXECUTE ON FUNCTION pg_reload_conf() TO it)"
            )
        return None
    grant = (
        " or the ALTER SYSTEM privilege on each (GRANT ALTER SYSTEM ON PARAMETER)"
        if server.server_version >= 150000
        else ""
    )
    return (
        f"role {server.role!r} may not change {', '.join(denied)}: ALTER SYSTEM"
        f" needs a superuser{grant}. On a managed service (Amazon RDS, Cloud SQL,"
        " Azure) use its parameter group or flags instead"
    )


def alter_statements(changes: Iterable[Recommendation]) -> list[sql.Composed]:
    """The ALTER SYSTEM statements that set the recommended values."""
    return [
        _alter_set(rec.name, setting_text(rec.recommended, rec.unit))
        for rec in changes
        if rec.recommended is not None
    ]


def _alter_set(name: str, value: str) -> sql.Composed:
    # Utility statements take no server-side parameters: the value is quoted
    # client-side as a literal.
    return sql.SQL("ALTER SYSTEM SET {} = {}").format(
        sql.Identifier(name), sql.Literal(value)
    )


def apply(
    conn: psycopg.Connection[Any],
    server: ServerSettings,
    recommendations: Sequence[Recommendation],
    audit: AuditLog | None = None,
) -> list[Applied]:
    """Set the recommended values with ALTER SYSTEM, reload, and report each.

    `conn` must be in autocommit mode. Each change is recorded in `audit`
    as it is written. Raises `ApplyRefused` (nothing changed) when the role
    may not make all of them, and `ApplyFailed` when one fails, after the
    ones before it were put back as far as possible.
    """
    changes = [rec for rec in recommendations if rec.is_change]
    if not changes:
        return []
    if not conn.autocommit:
        raise ValueError("ALTER SYSTEM needs a connection in autocommit mode")
    if refusal := apply_refusal(server, changes):
        raise ApplyRefused(refusal)
    audit = audit or AuditLog(None)
    where = _server_fields(conn, server)
    done: list[Recommendation] = []
    for rec, statement in zip(changes, alter_statements(changes), strict=True):
        try:
            conn.execute(statement)
        except psycopg.Error as exc:
            outcome = _undo(conn, server, done, audit, where)
            raise ApplyFailed(
                f"ALTER SYSTEM SET {rec.name} failed: {_first_line(exc)}; {outcome}"
            ) from None
        done.append(rec)
        previous = None if rec.current is None else setting_text(rec.current, rec.unit)
        audit.record(
            "alter_system",
            setting=rec.name,
            value=setting_text(rec.recommended or 0, rec.unit),
            previous=previous,
            needs_restart=rec.needs_restart,
            **where,
        )
    try:
        conn.execute("SELECT pg_catalog.pg_reload_conf()")
    except psycopg.Error as exc:
        outcome = _undo(conn, server, done, audit, where)
        raise ApplyFailed(
            f"reloading the configuration failed: {_first_line(exc)}; {outcome}"
        ) from None
    return _settle(conn, changes)


def _undo(
    conn: psycopg.Connection[Any],
    server: ServerSettings,
    done: Sequence[Recommendation],
    audit: AuditLog,
    where: Mapping[str, Any],
) -> str:
    """Put back postgresql.auto.conf as it was; say how that went."""
    kept = []
    for rec in reversed(done):
        if server.auto_conf is None:
            kept.append(rec.name)
            continue
        previous = server.auto_conf.get(rec.name)
        statement = (
            sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(rec.name))
            if previous is None
            else _alter_set(rec.name, previous)
        )
        try:
            conn.execute(statement)
        except psycopg.Error:
            kept.append(rec.name)
            continue
        audit.record("alter_system_undo", setting=rec.name, value=previous, **where)
    if kept:
        return f"could not put back {', '.join(kept)}: check postgresql.auto.conf"
    return "nothing was changed"


def _settle(
    conn: psycopg.Connection[Any], changes: Sequence[Recommendation]
) -> list[Applied]:
    """Wait until this session sees each change live or pending a restart."""
    # pg_reload_conf() only signals the server: each session, this one too,
    # rereads the files at its next command.
    names = [rec.name for rec in changes]
    deadline = time.monotonic() + _SETTLE_SECONDS
    while True:
        rows = conn.execute(
            "SELECT name, reset_val, pending_restart FROM pg_catalog.pg_settings"
            " WHERE name = ANY(%s)",
            [names],
        ).fetchall()
        seen = {name: (value, bool(pending)) for name, value, pending in rows}
        applied = [
            Applied(
                name=rec.name,
                value=rec.recommended or 0,
                unit=rec.unit,
                live=seen[rec.name][0] == str(rec.recommended),
                pending_restart=seen[rec.name][1],
            )
            for rec in changes
        ]
        if all(a.live or a.pending_restart for a in applied):
            return applied
        if time.monotonic() >= deadline:
            return applied
        time.sleep(0.05)


def _server_fields(
    conn: psycopg.Connection[Any], server: ServerSettings
) -> dict[str, Any]:
    # Not "host": the audit log's own field, the machine the command ran on.
    info = conn.info
    return {
        "server": f"{info.host}:{info.port}",
        "dbname": info.dbname,
        "role": server.role,
    }


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
