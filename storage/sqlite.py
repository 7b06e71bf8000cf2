"""SQLite storage through aiosqlite: WAL mode, numbered migrations, one writer.

All writes go through one connection (SQLite allows one writer at a time; a
single connection serialises them without lock errors). ``synchronous=FULL``
makes a committed transaction survive a power cut or ``kill -9``.
"""

from __future__ import annotations

import time
from pathlib import Path

import aiosqlite

from storage.migrations import MIGRATIONS, Migration


class StorageError(Exception):
    """The database could not be opened or used."""


class SQLiteStore:
    def __init__(self, path: Path, conn: aiosqlite.Connection) -> None:
        self.path = path
        self._conn = conn

    @classmethod
    async def open(
        cls, path: Path | str, migrations: tuple[Migration, ...] = MIGRATIONS
    ) -> SQLiteStore:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, aiosqlite.Error) as exc:
            raise StorageError(f"cannot open the database {path}: {exc}") from exc
        store = cls(path, conn)
        try:
            await store._prepare(migrations)
        except aiosqlite.Error as exc:
            await conn.close()
            raise StorageError(f"cannot prepare the database {path}: {exc}") from exc
        return store

    async def _prepare(self, migrations: tuple[Migration, ...]) -> None:
        conn = self._conn
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        async with conn.execute("SELECT version FROM schema_migrations") as cur:
            applied = {row[0] for row in await cur.fetchall()}
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version in applied:
                continue
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await _run_script(conn, migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise

    async def schema_version(self) -> int:
        async with self._conn.execute("SELECT MAX(version) FROM schema_migrations") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def ping(self) -> None:
        """Raise StorageError unless the database answers a query."""
        try:
            async with self._conn.execute("SELECT 1") as cur:
                await cur.fetchone()
        except (aiosqlite.Error, ValueError) as exc:
            raise StorageError(f"the database {self.path} does not answer: {exc}") from exc

    async def close(self) -> None:
        await self._conn.close()


async def _run_script(conn: aiosqlite.Connection, script: str) -> None:
    # executescript() would COMMIT first; run statement by statement to stay
    # inside the migration's transaction.
    for statement in script.split(";\n"):
        if statement.strip():
            await conn.execute(statement)
