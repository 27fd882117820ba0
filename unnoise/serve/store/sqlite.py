"""The job store in an embedded SQLite file: one machine, one or several processes.

Writers are serialized by ``BEGIN IMMEDIATE`` (the database's write lock, across processes too), so a claim's
read-then-update needs no row locks. ``JobStore`` is the single-process store the engine keeps its jobs in.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from unnoise.serve.store.base import NewJob, Store, Tx


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


class JobStore(SqliteStore):
    """The store of one ``unnoise serve`` process, which keeps its queue in memory: opening it fails the jobs that
    a previous process left queued or running (``recovered``: how many), since their process is gone and a client
    polling them must not wait forever; the engine records each job's start and end with ``insert``, ``started``
    and ``finished``, which hold no lease."""

    def __init__(self, path: str | Path, **options: Any):
        super().__init__(path, **options)
        self.recovered = self.fail_lost()

    def insert(self, job_id: str, api: str, spec: dict[str, Any], created: float) -> None:
        self.submit([NewJob(job_id, api, spec, created, images=int(spec.get("n", 1)))])

    def started(self, job_id: str, started: float, batch_size: int) -> None:
        with self._transaction(write=True) as tx:
            tx.run("UPDATE jobs SET status = 'running', started = ?, batch_size = ? WHERE id = ?",
                   (started, batch_size, job_id))  # fmt: skip

    def finished(self, job_id: str, status: str, finished: float, steps_done: int, *, error: str | None = None,
                 error_code: str | None = None, http_status: int | None = None, cancel_step: int | None = None,
                 images: Sequence[tuple[int, str, bytes]] = ()) -> None:  # fmt: skip
        """Final state; ``images`` are (seed, parameters, PNG bytes), written in the same transaction."""

        def update(tx: Tx, now: float) -> bool:
            tx.run("UPDATE jobs SET status = ?, finished = ?, steps_done = ?, error = ?, error_code = ?, "
                   "http_status = ?, cancel_step = ? WHERE id = ?",
                   (status, finished, steps_done, error, error_code, http_status, cancel_step, job_id))  # fmt: skip
            return True

        self._write_result(job_id, images, update)
