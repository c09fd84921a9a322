"""`pgwarden tune`: the server's connection settings, checked against the pools.

`read_settings` reads what the server runs with, `recommend` (no I/O) decides
what the applications' pools need and says why, and `apply` sets the
recommendations with ALTER SYSTEM, reloads, and reports which are live and
which wait for a restart. docs/tune.md explains each rule and its sources.

The modules: `settings` (reading), `rules` (recommending), `alter` (applying
with ALTER SYSTEM).
"""

from __future__ import annotations

from .._units import (
    local_memory,
    parse_memory,
    parse_value,
    setting_text,
    size_text,
    to_base,
)
from .alter import (
    Applied,
    ApplyFailed,
    ApplyRefused,
    alter_statements,
    apply,
    apply_refusal,
)
from .rules import Recommendation, config_snippet, recommend
from .settings import SETTINGS, ZERO_MEANS, ServerSettings, Setting, read_settings

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
