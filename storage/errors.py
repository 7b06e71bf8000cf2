"""The exceptions the storage package raises.

    StorageError         the database could not be opened, read or written (disk full,
    │                    locked by another process, corrupt, closed)
    └── DatabaseReplaced its file was removed or replaced under the running daemon

sqlite3/aiosqlite errors are converted where the I/O happens (storage/sqlite.py
for opening and reads, the writer process for writes); the daemon's middleware
(proxy/middleware.py) turns StorageError into a 503 storage_unavailable.
"""

from __future__ import annotations


class StorageError(Exception):
    """The database could not be opened or used."""


class DatabaseReplaced(StorageError):
    """The file at the database's path is no longer the one opened (deleted, moved, or
    another file put there): what would be written now would not be found at the next
    start, so nothing more is written until the daemon is restarted."""

    def __init__(self, path: object) -> None:
        super().__init__(
            f"the database file {path} was removed or replaced while lmbridge was running; "
            "lmbridge writes nothing more to it, since that would be lost at the next "
            "start: restart lmbridge"
        )
        self.path = path
