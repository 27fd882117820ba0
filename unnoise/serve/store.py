"""Jobs and their images in an embedded SQLite database, so that a restart loses no finished job.

One connection shared by the API and the worker thread behind a lock (writes are a few rows per job, never per
step). Opening the database marks the jobs that a previous process left queued or running as failed: their
process is gone, and a client polling them must not wait forever.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    api TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    steps_done INTEGER NOT NULL DEFAULT 0,
    batch_size INTEGER,
    error TEXT,
    error_code TEXT,
    http_status INTEGER,
    cancel_step INTEGER
);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    parameters TEXT NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""
ACTIVE = ("queued", "running")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
LOST = "the server stopped while this job was {status}; submit it again"


class JobStore:
    """``insert`` / ``started`` / ``finished`` from the engine; ``get`` / ``page`` / ``image`` for the API."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self.recovered = self._fail_lost_jobs()

    def _fail_lost_jobs(self) -> int:
        """Jobs a previous process left queued or running become failed (500); returns how many."""
        now = time.time()
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE jobs SET error = CASE status WHEN 'queued' THEN ? ELSE ? END, status = 'failed', finished = ?, "
                "error_code = 'server_restarted', http_status = 500 WHERE status IN ('queued', 'running')",
                (LOST.format(status="queued"), LOST.format(status="running"), now),
            )
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes (engine) ---------------------------------------------------------------------------------------------

    def insert(self, job_id: str, api: str, spec: dict[str, Any], created: float) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO jobs (id, api, status, spec, created) VALUES (?, ?, 'queued', ?, ?)",
                (job_id, api, json.dumps(spec), created),
            )

    def started(self, job_id: str, started: float, batch_size: int) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE jobs SET status = 'running', started = ?, batch_size = ? WHERE id = ?",
                (started, batch_size, job_id),
            )

    def finished(self, job_id: str, status: str, finished: float, steps_done: int, *, error: str | None = None,
                 error_code: str | None = None, http_status: int | None = None, cancel_step: int | None = None,
                 images: list[tuple[int, str, bytes]] = ()) -> None:  # fmt: skip
        """Final state; ``images`` are (seed, parameters, PNG bytes), written in the same transaction."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE jobs SET status = ?, finished = ?, steps_done = ?, error = ?, error_code = ?, "
                "http_status = ?, cancel_step = ? WHERE id = ?",
                (status, finished, steps_done, error, error_code, http_status, cancel_step, job_id),
            )
            self._db.executemany(
                "INSERT INTO images (job_id, idx, seed, parameters, png) VALUES (?, ?, ?, ?, ?)",
                [(job_id, i, seed, params, png) for i, (seed, params, png) in enumerate(images)],
            )

    # -- reads (API) -------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's row with ``spec`` decoded and ``images`` as [{index, seed, parameters}], or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            images = self._db.execute(
                "SELECT idx, seed, parameters FROM images WHERE job_id = ? ORDER BY idx", (job_id,)
            ).fetchall()
        return _record(row, images)

    def page(self, limit: int, offset: int, status: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Jobs newest first, ``limit`` from ``offset``, optionally of one status; and the total count."""
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)
            ).fetchall()
            images = {
                row[0]: self._db.execute(
                    "SELECT idx, seed, parameters FROM images WHERE job_id = ? ORDER BY idx", (row[0],)
                ).fetchall()
                for row in rows
            }
        return [_record(row, images[row[0]]) for row in rows], total

    def image(self, job_id: str, index: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT png FROM images WHERE job_id = ? AND idx = ?", (job_id, index)).fetchone()
        return None if row is None else bytes(row[0])


_COLUMNS = (
    "id, api, status, spec, created, started, finished, steps_done, batch_size, error, error_code, http_status, "
    "cancel_step"
)


def _record(row: tuple[Any, ...], images: list[tuple[Any, ...]]) -> dict[str, Any]:
    names = [c.strip() for c in _COLUMNS.split(",")]
    record = dict(zip(names, row, strict=True))
    record["spec"] = json.loads(record["spec"])
    record["images"] = [{"index": i, "seed": seed, "parameters": params} for i, seed, params in images]
    return record
