"""The one exception the storage package raises.

    StorageError   the database could not be opened, read or written (disk full,
                   locked by another process, corrupt, closed)

sqlite3/aiosqlite errors are converted where the I/O happens (storage/sqlite.py
for opening and reads, the writer process for writes); the daemon's middleware
(proxy/middleware.py) turns StorageError into a 503 storage_unavailable.
"""

from __future__ import annotations


class StorageError(Exception):
    """The database could not be opened or used."""
