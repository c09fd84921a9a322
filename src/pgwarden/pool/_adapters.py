"""The adapters of a pooled connection, which notice what a borrower registers.

A borrower may register loaders, dumpers or types on `conn.adapters`; the next
borrower of the connection must not get them. psycopg's own flags for the
tables a map owns can't tell: they are cleared whenever a cursor is made from
the map. So a pooled connection gets a map that flags any registration, and
the give-back replaces it when the flag is up.
"""

from __future__ import annotations

from psycopg import postgres
from psycopg.abc import Dumper, Loader
from psycopg.adapt import AdaptersMap
from psycopg.types import TypeInfo, TypesRegistry


def watched_adapters() -> _Adapters:
    """Adapters made from psycopg's global ones, with `changed` down."""
    return _Adapters(postgres.adapters)


class _Adapters(AdaptersMap):
    """A pooled connection's adapters: `changed` once a borrower registers a
    loader, a dumper or (on `types`) a type on them."""

    def __init__(self, template: AdaptersMap) -> None:
        super().__init__(template)
        self.types: _Types = _Types(template.types)
        self.changed = False

    def register_dumper(self, cls: type | str | None, dumper: type[Dumper]) -> None:
        self.changed = True
        super().register_dumper(cls, dumper)

    def register_loader(self, oid: int | str, loader: type[Loader]) -> None:
        self.changed = True
        super().register_loader(oid, loader)


class _Types(TypesRegistry):
    """A pooled connection's type registry: `changed` once a type is added."""

    def __init__(self, template: TypesRegistry) -> None:
        super().__init__(template)
        self.changed = False

    def add(self, info: TypeInfo) -> None:
        self.changed = True
        super().add(info)

    def clear(self) -> None:
        self.changed = True
        super().clear()
