"""`MonitorSettings`: how often the health monitor checks and what it alerts on."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final, Self

from ..config import (
    _parse_int,
    _read_env_file,
    _unknown_setting,
    parse_duration,
    read_environment,
)
from ..errors import ConfigError

ENV_VARS: Final[Mapping[str, str]] = {
    "health_check_interval": "DB_HEALTH_CHECK_INTERVAL",
    "warn_pool_in_use": "DB_WARN_POOL_IN_USE",
    "warn_active_connections": "DB_WARN_ACTIVE_CONNECTIONS",
    "warn_idle_in_transaction": "DB_WARN_IDLE_IN_TRANSACTION",
    "long_query_threshold": "DB_LONG_QUERY_THRESHOLD",
    "lock_wait_threshold": "DB_LOCK_WAIT_THRESHOLD",
    "warn_usage_ratio": "DB_WARN_USAGE_RATIO",
    "critical_usage_ratio": "DB_CRITICAL_USAGE_RATIO",
    "alert_repeat_interval": "DB_ALERT_REPEAT_INTERVAL",
    "alert_webhook_url": "DB_ALERT_WEBHOOK_URL",
}
"""The environment variable of each `MonitorSettings` field."""

_DURATIONS: Final = (
    "health_check_interval",
    "warn_idle_in_transaction",
    "long_query_threshold",
    "lock_wait_threshold",
    "alert_repeat_interval",
)
_COUNTS: Final = ("warn_pool_in_use", "warn_active_connections")
_RATIOS: Final = ("warn_usage_ratio", "critical_usage_ratio")


@dataclass(frozen=True, kw_only=True)
class MonitorSettings:
    """Thresholds of the health monitor, checked when built.

    Defaults follow the original system: a check every 30 s, a warning when a
    pool has more than 15 connections in use or the server more than 15 active
    ones. Durations accept the same forms as `PoolConfig` (``"30s"``, ``"5m"``).

    Fields (environment variable):
        health_check_interval (DB_HEALTH_CHECK_INTERVAL): time between checks.
        warn_pool_in_use (DB_WARN_POOL_IN_USE): warn when a pool has more
            connections in use ("pool getting full").
        warn_active_connections (DB_WARN_ACTIVE_CONNECTIONS): warn when the
            database has more active sessions.
        warn_idle_in_transaction (DB_WARN_IDLE_IN_TRANSACTION): warn about
            sessions idle in transaction for longer.
        long_query_threshold (DB_LONG_QUERY_THRESHOLD): warn about queries
            running longer.
        lock_wait_threshold (DB_LOCK_WAIT_THRESHOLD): warn about sessions
            waiting on a lock for longer.
        warn_usage_ratio, critical_usage_ratio (DB_WARN_USAGE_RATIO,
            DB_CRITICAL_USAGE_RATIO): server connections over what
            non-superusers may use that make a warning, a critical alert.
        alert_repeat_interval (DB_ALERT_REPEAT_INTERVAL): an alert that lasts is
            repeated at most this often.
        alert_webhook_url (DB_ALERT_WEBHOOK_URL): if set, alert events are also
            POSTed there as JSON.
    """

    health_check_interval: float = 30.0
    warn_pool_in_use: int = 15
    warn_active_connections: int = 15
    warn_idle_in_transaction: float = 30.0
    long_query_threshold: float = 30.0
    lock_wait_threshold: float = 10.0
    warn_usage_ratio: float = 0.80
    critical_usage_ratio: float = 0.95
    alert_repeat_interval: float = 600.0
    alert_webhook_url: str | None = None

    def __post_init__(self) -> None:
        for name, value in _validate(self._values(), {}).items():
            object.__setattr__(self, name, value)

    def _values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_file: str | os.PathLike[str] | None = ".env",
        **overrides: Any,
    ) -> Self:
        """Read the settings from the environment, then `env_file`; keywords win."""
        _reject_unknown(overrides)
        env = read_environment(environ, _read_env_file(env_file))
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, var in ENV_VARS.items():
            if var in env:
                values[name], sources[name] = env[var], var
        values.update(overrides)
        for name in overrides:
            sources.pop(name, None)
        return cls(**_validate({**cls()._values(), **values}, sources))

    def replace(self, **changes: Any) -> Self:
        """A checked copy with `changes` applied."""
        _reject_unknown(changes)
        return replace(self, **changes)


def _reject_unknown(names: Mapping[str, Any]) -> None:
    for name in names:
        if name not in ENV_VARS:
            raise _unknown_setting(name)


def _validate(raw: Mapping[str, Any], sources: Mapping[str, str]) -> dict[str, Any]:
    out = dict(raw)
    for name in _DURATIONS:
        out[name] = parse_duration(raw[name], sources.get(name, name), allow_zero=False)
    for name in _COUNTS:
        out[name] = _parse_int(raw[name], sources.get(name, name), 0)
    for name in _RATIOS:
        out[name] = _parse_ratio(raw[name], sources.get(name, name))
    if out["warn_usage_ratio"] > out["critical_usage_ratio"]:
        raise ConfigError(
            f"warn_usage_ratio={out['warn_usage_ratio']} is above"
            f" critical_usage_ratio={out['critical_usage_ratio']}"
        )
    url = raw["alert_webhook_url"]
    if url is not None and not (
        isinstance(url, str) and url.startswith(("http://", "https://"))
    ):
        source = sources.get("alert_webhook_url", "alert_webhook_url")
        raise ConfigError(f"{source} must be an http:// or https:// URL")
    return out


def _parse_ratio(value: object, source: str) -> float:
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ratio = -1.0
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(
            f"{source}={value!r} is not a ratio; expected a number in (0, 1], e.g. 0.8"
        )
    return ratio
