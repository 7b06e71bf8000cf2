"""Numbered schema migrations. Each runs once, in order, in its own transaction,
and is recorded in ``schema_migrations``; never edit one that has shipped, add
the next number instead."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = ()
