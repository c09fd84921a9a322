"""What the server runs with: `read_settings` and what it returns.

Values are integers in the setting's own unit, as `pg_settings` reports them
(``unit``: None, ``ms``, ``s``, ``kB``, ``8kB``...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.rows import dict_row

from pgwarden.errors import PgwardenError

from .._units import parse_value

__all__ = ["SETTINGS", "ZERO_MEANS", "ServerSettings", "Setting", "read_settings"]

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
    may_reload: bool = True  # may call pg_reload_conf()

    def value(self, name: str, default: int = 0) -> int:
        setting = self.settings.get(name)
        if setting is None or setting.value is None:
            return default
        return setting.value


_ROLE_SQL = """\
SELECT r.rolname, r.rolsuper,
       pg_catalog.current_setting('allow_alter_system', true) AS allow_alter_system,
       pg_catalog.has_table_privilege('pg_catalog.pg_file_settings', 'SELECT')
       AND pg_catalog.has_function_privilege(
           'pg_catalog.pg_show_all_file_settings()', 'EXECUTE') AS reads_files,
       pg_catalog.has_function_privilege(
           'pg_catalog.pg_reload_conf()', 'EXECUTE') AS reloads
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
        may_reload=bool(role["reloads"]),
    )
