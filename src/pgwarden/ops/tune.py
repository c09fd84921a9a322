"""`pgwarden tune`: the server's connection settings, checked against the pools.

`read_settings` reads what the server runs with, `recommend` (no I/O) decides
what the applications' pools need and says why, and `apply` sets the
recommendations with ALTER SYSTEM, reloads, and reports which are live and
which wait for a restart. docs/tune.md explains each rule and its sources.

Values are integers in the setting's own unit, as `pg_settings` reports them
(``unit``: None, ``ms``, ``s``, ``kB``, ``8kB``...).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgwarden.errors import PgwardenError

from ._units import (
    local_memory,
    parse_memory,
    parse_value,
    setting_text,
    size_text,
    to_base,
)
from .audit import AuditLog

__all__ = [
    "SETTINGS",
    "ZERO_MEANS",
    "Applied",
    "ApplyFailed",
    "ApplyRefused",
    "Recommendation",
    "ServerSettings",
    "Setting",
    "alter_statements",
    "apply",
    "apply_refusal",
    "config_snippet",
    "local_memory",
    "parse_memory",
    "parse_value",
    "read_settings",
    "recommend",
    "setting_text",
    "size_text",
    "to_base",
]

SETTINGS: Final = (
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",  # PostgreSQL 16+
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",  # PostgreSQL 14+
    "statement_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "work_mem",
    "shared_buffers",
)
"""The settings `pgwarden tune` reads, in the order it shows them."""

POOL_FACTOR: Final = 3  # the original guidance: 2-3x the applications' pools
ADMIN_HEADROOM: Final = 10  # psql, migrations, scripts, monitoring
MAX_CONNECTIONS_STEP: Final = 10  # recommend round numbers
IDLE_IN_TRANSACTION_TIMEOUT_MS: Final = 300_000  # the kill-idle cron job's 5 min
KEEPALIVES: Final = {
    "tcp_keepalives_idle": 60,
    "tcp_keepalives_interval": 10,
    "tcp_keepalives_count": 6,
}
WORK_MEM_SHARE: Final = 0.25  # of the memory, for work_mem x max_connections
SHARED_BUFFERS_SHARE: Final = 0.25  # the docs' starting point on a dedicated server

ZERO_MEANS: Final = {
    "idle_in_transaction_session_timeout": "off",
    "idle_session_timeout": "off",
    "statement_timeout": "off",
    "tcp_keepalives_idle": "OS default",
    "tcp_keepalives_interval": "OS default",
    "tcp_keepalives_count": "OS default",
}
"""What 0 means for a setting, where it means something special."""

# Where pg_settings' value was set by the session rather than the server's
# configuration ('session', a SET, keeps the configured value in reset_val).
_SESSION_SOURCES: Final = frozenset({"client", "database", "user", "database user"})
_SETTLE_SECONDS: Final = 5.0


# -- what the server runs with -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One server setting, as the server's configuration sets it.

    `value` is the server-wide value in `unit`, None when this session sets
    its own and the role may not read the configuration files. `context` is
    pg_settings' (``postmaster`` settings need a restart). `pending_value` is
    the value waiting for that restart, when one does and it can be read.
    `may_alter` says whether this role may change it with ALTER SYSTEM.
    """

    name: str
    value: int | None
    unit: str | None
    context: str
    pending_restart: bool = False
    pending_value: int | None = None
    may_alter: bool = False


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What `read_settings` found: the settings, and who may change them.

    `auto_conf` holds the values in postgresql.auto.conf for the settings in
    `settings` (as written there), or is None when this role may not read them.
    """

    server_version: int
    role: str
    superuser: bool
    alter_system_enabled: bool
    settings: Mapping[str, Setting]
    auto_conf: Mapping[str, str] | None = None

    def value(self, name: str, default: int = 0) -> int:
        setting = self.settings.get(name)
        if setting is None or setting.value is None:
            return default
        return setting.value


_ROLE_SQL = """\
SELECT r.rolname, r.rolsuper,
       pg_catalog.current_setting('allow_alter_system', true) AS allow_alter_system,
       pg_catalog.has_function_privilege(
           'pg_catalog.pg_show_all_file_settings()', 'EXECUTE') AS reads_files
FROM pg_catalog.pg_roles AS r
WHERE r.rolname = CURRENT_USER
"""
_SETTINGS_SQL = """\
SELECT s.name, s.reset_val, s.boot_val, s.unit, s.context, s.source,
       s.pending_restart, {may_alter} AS may_alter
FROM pg_catalog.pg_settings AS s
WHERE s.name = ANY(%(names)s)
"""
_MAY_ALTER_15 = "pg_catalog.has_parameter_privilege(s.name, 'ALTER SYSTEM')"
_FILES_SQL = """\
SELECT f.name, f.setting, f.sourcefile
FROM pg_catalog.pg_file_settings AS f
WHERE f.name = ANY(%(names)s) AND f.setting IS NOT NULL
ORDER BY f.seqno
"""


def read_settings(
    conn: psycopg.Connection[Any], names: Iterable[str] = SETTINGS
) -> ServerSettings:
    """Read `names` (default `SETTINGS`) and the role's right to change them.

    Settings the server does not have (``reserved_connections`` before
    PostgreSQL 16) are left out. Superusers also get the values waiting in
    the configuration files for a restart, and postgresql.auto.conf's.
    """
    names = list(names)
    version = conn.info.server_version
    with conn.cursor(row_factory=dict_row) as cur:
        role = cur.execute(_ROLE_SQL).fetchone()
        if role is None:
            raise PgwardenError("the current role is not in pg_roles")
        may_alter = _MAY_ALTER_15 if version >= 150000 else "NULL::pg_catalog.bool"
        query = _SETTINGS_SQL.format(may_alter=may_alter)
        rows = cur.execute(query, {"names": names}).fetchall()
        file_rows = (
            cur.execute(_FILES_SQL, {"names": names}).fetchall()
            if role["reads_files"]
            else None
        )
    # In seqno order: the last line for a name is the one the server uses.
    files = {row["name"]: row["setting"] for row in file_rows or ()}
    auto_conf = None
    if file_rows is not None:
        auto_conf = {
            row["name"]: row["setting"]
            for row in file_rows
            if row["sourcefile"].endswith("postgresql.auto.conf")
        }
    settings = {}
    for row in sorted(rows, key=lambda r: names.index(r["name"])):
        unit = row["unit"]
        from_file = files.get(row["name"])
        file_value = None if from_file is None else parse_value(from_file, unit)
        if row["source"] not in _SESSION_SOURCES:
            value: int | None = int(row["reset_val"])
        elif file_rows is not None:
            value = file_value if from_file is not None else int(row["boot_val"])
        else:
            value = None
        pending = bool(row["pending_restart"])
        settings[row["name"]] = Setting(
            name=row["name"],
            value=value,
            unit=unit,
            context=row["context"],
            pending_restart=pending,
            pending_value=file_value if pending else None,
            may_alter=bool(
                role["rolsuper"] if row["may_alter"] is None else row["may_alter"]
            ),
        )
    return ServerSettings(
        server_version=version,
        role=role["rolname"],
        superuser=bool(role["rolsuper"]),
        alter_system_enabled=role["allow_alter_system"] != "off",
        settings=settings,
        auto_conf=auto_conf,
    )


# -- what the pools need -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One setting: its value, the value recommended, and why.

    `recommended` is None to keep the current value. `needs_restart`: the
    setting only changes at a server restart. `pending_restart`: a changed
    value already waits for one. `warning` is a problem worth attention that
    changing this setting alone would not solve.
    """

    name: str
    current: int | None
    recommended: int | None
    unit: str | None
    reason: str
    needs_restart: bool
    pending_restart: bool = False
    warning: str | None = None

    @property
    def is_change(self) -> bool:
        return self.recommended is not None

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON fields (docs/tune.md)."""
        return {
            "name": self.name,
            "current": self.current,
            "recommended": self.recommended,
            "unit": self.unit,
            "reason": self.reason,
            "needs_restart": self.needs_restart,
            "pending_restart": self.pending_restart,
        }


@dataclass(frozen=True, slots=True)
class _Facts:
    server: ServerSettings
    pool_total: int
    memory: int | None
    max_connections: int  # the one to live with: recommended, else current


def recommend(
    server: ServerSettings,
    pool_size: int,
    instances: int = 1,
    memory: int | None = None,
) -> list[Recommendation]:
    """What `server` should run with for `instances` pools of `pool_size`.

    Pure: no I/O. `memory` is the server's memory in bytes, if known, for the
    work_mem check. Every setting in `server` gets a `Recommendation`, in
    `SETTINGS` order; max_connections is never lowered.
    """
    if pool_size < 1 or instances < 1:
        raise ValueError("pool_size and instances must be at least 1")
    pool_total = pool_size * instances
    facts = _Facts(server, pool_total, memory, 0)
    out: list[Recommendation] = []
    if "max_connections" in server.settings:
        setting = server.settings["max_connections"]
        first = _max_connections(setting, facts)
        wanted = first.recommended or setting.pending_value or first.current or 0
        facts = replace(facts, max_connections=wanted)
    for name, setting in server.settings.items():
        rule = _RULES.get(name, _report_only)
        rec = rule(setting, facts)
        if rec.pending_restart and rec.warning is None and name != "max_connections":
            rec = replace(
                rec, warning=f"{name} has a changed value that waits for a restart"
            )
        out.append(rec)
    return out


def _rec(
    s: Setting, reason: str, recommended: int | None = None, warning: str | None = None
) -> Recommendation:
    return Recommendation(
        name=s.name,
        current=s.value,
        recommended=recommended,
        unit=s.unit,
        reason=reason,
        needs_restart=s.context == "postmaster",
        pending_restart=s.pending_restart,
        warning=warning,
    )


def _text(s: Setting, value: int | None = None) -> str:
    value = s.value if value is None else value
    return "unknown" if value is None else setting_text(value, s.unit)


_HIDDEN = "not visible: this session sets its own value (a superuser sees the server's)"


def _max_connections(s: Setting, f: _Facts) -> Recommendation:
    reserved = f.server.value("superuser_reserved_connections") + f.server.value(
        "reserved_connections"
    )
    needed = POOL_FACTOR * f.pool_total + reserved + ADMIN_HEADROOM
    budget = (
        f"{POOL_FACTOR} x {f.pool_total} pooled + {reserved} reserved"
        f" + {ADMIN_HEADROOM} for admin, migrations and monitoring = {needed}"
    )
    waiting = s.pending_value if s.pending_value != s.value else None
    after_restart = s.value if waiting is None else waiting
    if after_restart is not None and after_restart >= needed:
        if waiting is None:
            return _rec(s, f"covers {budget}")
        return _rec(
            s,
            f"{waiting} is set and waits for a restart; it covers {budget}",
            warning=f"max_connections = {waiting} takes effect at the next"
            " server restart",
        )
    target = math.ceil(needed / MAX_CONNECTIONS_STEP) * MAX_CONNECTIONS_STEP
    why = "too few" if waiting is None else f"a restart would set {waiting}, too few"
    return _rec(
        s,
        f"{why} for {budget} (pools are replaced side by side during deploys;"
        " scripts and monitoring need their own)",
        recommended=max(target, s.value or 0),  # never lower it
    )


def _reserved(s: Setting, f: _Facts) -> Recommendation:
    if s.name == "reserved_connections" and s.value == 0:
        return _rec(
            s,
            "none kept for monitoring or admin roles (pg_use_reserved_connections);"
            " optional",
        )
    who = "superusers" if s.name.startswith("superuser") else "reserved roles"
    return _rec(s, f"{_text(s)} kept for {who}, counted in max_connections above")


def _idle_in_transaction(s: Setting, f: _Facts) -> Recommendation:
    if s.value is None:
        return _rec(s, _HIDDEN)
    if s.value == 0:
        target = IDLE_IN_TRANSACTION_TIMEOUT_MS
        return _rec(
            s,
            "off: a session forgotten in a transaction keeps its locks and holds"
            f" back vacuum; {setting_text(target, s.unit)} ends it on the server,"
            " replacing the kill-idle cron job (pgwarden pools also set it per"
            " session)",
            recommended=target,
        )
    return _rec(s, "sessions idle in a transaction longer are ended")


def _idle_session(s: Setting, f: _Facts) -> Recommendation:
    if s.value is None:
        return _rec(s, _HIDDEN)
    if s.value == 0:
        return _rec(
            s,
            "off server-wide, as it should be: pools keep idle sessions open on"
            " purpose",
        )
    return _rec(
        s,
        "set server-wide: it also closes the idle connections pools keep;"
        " the docs say to be wary of it with connection pools",
        warning=f"idle_session_timeout = {_text(s)} closes pooled connections"
        " that wait idle longer; prefer 0 server-wide and ALTER ROLE ... SET"
        " for the clients that need it",
    )


def _statement_timeout(s: Setting, f: _Facts) -> Recommendation:
    if s.value is None:
        return _rec(s, _HIDDEN)
    if s.value == 0:
        return _rec(
            s,
            "off server-wide, as the docs advise: set it per role (ALTER ROLE ..."
            " SET) or per session (pgwarden pools: DB_STATEMENT_TIMEOUT)",
        )
    return _rec(
        s,
        "set server-wide, which the docs advise against: it also stops"
        " migrations, dumps and maintenance",
        warning=f"statement_timeout = {_text(s)} applies to every session,"
        " migrations and pg_dump included; prefer setting it per role or session",
    )


_KEEPALIVE_DEFAULTS: Final = {  # Linux's
    "tcp_keepalives_idle": "2h",
    "tcp_keepalives_interval": "75s",
    "tcp_keepalives_count": "9",
}


def _keepalive(s: Setting, f: _Facts) -> Recommendation:
    if s.value is None:
        return _rec(s, _HIDDEN)
    if s.value != 0:
        return _rec(s, "set; dead clients are found by TCP keepalives")
    reason = f"0: the OS default ({_KEEPALIVE_DEFAULTS[s.name]} on Linux)"
    if s.name == "tcp_keepalives_idle":
        idle, interval, count = KEEPALIVES.values()
        reason += (
            " lets a vanished client (crash, network cut) hold its connection"
            f" that long; probing after {idle}s, every {interval}s, {count} times"
            f" frees it in about {(idle + interval * count) // 60} minutes"
        )
    else:
        reason += "; see tcp_keepalives_idle"
    return _rec(s, reason, recommended=KEEPALIVES[s.name])


def _work_mem(s: Setting, f: _Facts) -> Recommendation:
    if s.value is None:
        return _rec(s, _HIDDEN)
    _, per_node = to_base(s.value, s.unit)
    total = per_node * f.max_connections
    product = f"{_text(s)} x {f.max_connections} connections = {size_text(total)}"
    if f.memory is None:
        return _rec(s, f"{product}; the server's memory is unknown, so not checked")
    share = total / f.memory
    reason = (
        f"{product}, {_percent(share)} of {size_text(f.memory)}: each sort or hash in a"
        " query may use work_mem"
    )
    if share <= WORK_MEM_SHARE:
        return _rec(s, reason)
    return _rec(
        s,
        reason,
        warning=f"work_mem x max_connections = {size_text(total)} is"
        f" {_percent(share)} of the server's {size_text(f.memory)}, over"
        f" {WORK_MEM_SHARE:.0%}: busy connections could exhaust the memory"
        " (each sort or hash node may use work_mem); lower work_mem, or put a"
        " pooler in front of fewer connections",
    )


def _shared_buffers(s: Setting, f: _Facts) -> Recommendation:
    if s.value is None or f.memory is None:
        return _rec(s, "reported only")
    _, size = to_base(s.value, s.unit)
    share = size / f.memory
    reason = f"{_percent(share)} of {size_text(f.memory)}; reported only"
    if share < SHARED_BUFFERS_SHARE / 2:
        reason += (
            f" (the docs suggest {SHARED_BUFFERS_SHARE:.0%} of the memory as a"
            " start on a dedicated server; it needs a restart)"
        )
    return _rec(s, reason)


def _percent(share: float) -> str:
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


def _report_only(s: Setting, f: _Facts) -> Recommendation:
    return _rec(s, "reported only")


_RULES: Final[Mapping[str, Callable[[Setting, _Facts], Recommendation]]] = {
    "max_connections": _max_connections,
    "superuser_reserved_connections": _reserved,
    "reserved_connections": _reserved,
    "idle_in_transaction_session_timeout": _idle_in_transaction,
    "idle_session_timeout": _idle_session,
    "statement_timeout": _statement_timeout,
    **dict.fromkeys(KEEPALIVES, _keepalive),
    "work_mem": _work_mem,
    "shared_buffers": _shared_buffers,
}


def config_snippet(changes: Iterable[Recommendation]) -> str:
    """postgresql.conf lines that set the recommended values (one per line)."""
    return "".join(
        f"{rec.name} = {setting_text(rec.recommended, rec.unit)}\n"
        for rec in changes
        if rec.recommended is not None
    )


# -- changing them -------------------------------------------------------------


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
            kept = _undo(conn, server, done, audit, where)
            outcome = (
                f"could not put back {', '.join(kept)}: check postgresql.auto.conf"
                if kept
                else "nothing was changed"
            )
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
    conn.execute("SELECT pg_catalog.pg_reload_conf()")
    return _settle(conn, changes)


def _undo(
    conn: psycopg.Connection[Any],
    server: ServerSettings,
    done: Sequence[Recommendation],
    audit: AuditLog,
    where: Mapping[str, Any],
) -> list[str]:
    """Put back postgresql.auto.conf as it was; the names that could not be."""
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
    return kept


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
