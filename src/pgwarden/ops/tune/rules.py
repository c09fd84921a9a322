"""What the pools need: `recommend` and its rule for each setting (no I/O)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from .._units import setting_text, size_text, to_base
from .settings import ServerSettings, Setting

__all__ = ["Recommendation", "config_snippet", "recommend"]

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
