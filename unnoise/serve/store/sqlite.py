"""The job store in an embedded SQLite file: one machine, one or several processes.

Writers are serialized by ``BEGIN IMMEDIATE`` (the database's write lock, across processes too), so a claim's
read-then-update needs no row locks.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unnoise.serve.store.base import Store, Tx


class SqliteStore(Store):
    """``Store`` in the SQLite file ``path`` (":memory:": a private in-memory database); options as ``Store``'s."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, **options: Any):
        super().__init__(**options)
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are begun explicitly, so that a claim can begin one IMMEDIATE
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
