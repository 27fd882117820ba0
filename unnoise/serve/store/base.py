"""The job store's contract, written once over SQL: a durable queue that workers share through leases, the one
result of each job, its images, and the history the API lists.

A job's life. ``submit`` inserts it queued. ``claim`` takes the oldest queued job and the later queued jobs with
its batch key while their images fit, marks them running and leases them to one worker for ``lease_s`` seconds,
counting an attempt. The worker calls ``renew`` (or ``progress``, which also records its step) well within the
lease; the answer says which jobs it still holds and which a client asked to cancel. ``complete`` records the
job's final state and images only while the lease is held, so however many workers ran a job, one result is
recorded. ``expire`` (any worker, before it claims) ends what nobody holds any more: a job whose lease ran out
goes back to the queue, or fails after ``max_attempts`` claims (a job that kills its worker must not loop), or
is cancelled if a cancel was asked meanwhile; a queued job past its deadline fails with 504. ``cancel`` ends a
queued job at once and flags a running one for its worker.

Times come from ``clock`` (``time.time``; tests pass their own), so every replica must keep its clock in step
with the others to well within a lease. The backends (``SqliteStore``, ``PostgresStore``) supply the connection,
its transactions and the row locking of a claim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unnoise.serve.store.schema import migrate

FINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
STATUSES = (*ACTIVE, *FINAL)
LOST = "the server stopped while this job was {status}; submit it again"
DEFAULT_LEASE_S = 30.0
DEFAULT_MAX_ATTEMPTS = 3
_COLUMNS = (
    "id", "api", "status", "spec", "created", "started", "finished", "steps_done", "batch_size", "error",
    "error_code", "http_status", "cancel_step", "attempts", "worker", "lease_until", "deadline", "group_id",
    "batch_key", "n_images",
)  # fmt: skip
_SELECT = ", ".join(_COLUMNS)
_HELD = "status = 'running' AND worker = ? AND lease_until > ?"  # a lease is held until the instant it ends


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (an outage); the call may be retried later."""


class QueueFull(RuntimeError):
    """``submit`` would leave more than ``limit`` jobs queued; nothing was inserted."""

    def __init__(self, queued: int, limit: int):
        super().__init__(f"the queue is full ({queued} of {limit} jobs waiting); retry later")
        self.queued, self.limit = queued, limit


@dataclasses.dataclass(frozen=True)
class NewJob:
    """A job to ``submit``: its record's fields, and how the queue treats it."""

    id: str
    api: str
    spec: dict[str, Any]  # the request as the API shows it (JSON)
    created: float
    images: int = 1  # images it makes: what a claim's room counts
    batch_key: str | None = None  # jobs with equal keys may share a claim (``batch_key_digest``); None: alone
    deadline: float | None = None  # past it, a queued job fails with 504 and is never claimed
    group_id: str | None = None  # the jobs of one request (AUTOMATIC1111's n_iter), for the engine
    inputs: bytes | None = None  # what a worker needs beyond ``spec`` (input images), returned by ``claim``


@dataclasses.dataclass(frozen=True)
class Renewal:
    """What ``renew`` / ``progress`` found: the jobs whose lease was extended (the others are lost: another worker
    may run them; stop them) and, of those, the ones a client asked to cancel: {job id: (code, reason)}."""

    held: frozenset[str]
    cancel: dict[str, tuple[str, str]]


def batch_key_digest(key: tuple[Any, ...]) -> str:
    """A stored batch key: sha256 of the key's ``repr`` (the pipeline's ``ResolvedRequest.batch_key`` holds numbers,
    strings, tuples and dataclasses, whose reprs are exact and stable across processes of one unnoise version)."""
    return hashlib.sha256(repr(key).encode()).hexdigest()


class Tx:
    """One transaction's statements, written with ``?`` placeholders whatever the driver's style."""

    def __init__(self, conn: Any, placeholder: str = "?"):
        self._conn, self._placeholder = conn, placeholder

    def _execute(self, sql: str, args: Sequence[Any]) -> Any:
        return self._conn.execute(sql if self._placeholder == "?" else sql.replace("?", self._placeholder), args)

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._execute(sql, args).fetchall()]

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self.all(sql, args)
        return rows[0] if rows else None

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; the rows it changed."""
        return self._execute(sql, args).rowcount


class Store:
    """The queue and history of jobs over one database (see the module's docstring for the contract).

    ``images_dir``: PNGs go to files there (a folder every replica mounts) instead of the database. ``lease_s``:
    how long a claim or renewal holds a job. ``max_attempts``: claims of a job whose lease ran out before it
    fails. Thread-safe.
    """

    dialect = ""
    _skip_locked = ""  # the row lock of claim and expire (PostgreSQL: FOR UPDATE SKIP LOCKED)

    def __init__(self, *, images_dir: str | Path | None = None, lease_s: float = DEFAULT_LEASE_S,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, clock: Callable[[], float] = time.time):  # fmt: skip
        if not lease_s > 0:
            raise ValueError(f"lease_s={lease_s!r} is not allowed; expected a number of seconds > 0")
        if not (isinstance(max_attempts, int) and max_attempts >= 1):
            raise ValueError(f"max_attempts={max_attempts!r} is not allowed; expected an integer >= 1")
        self.images_dir = None if images_dir is None else Path(images_dir)
        self.lease_s, self.max_attempts, self.clock = float(lease_s), max_attempts, clock
        self._lock = threading.Lock()
        self.schema_found = 0  # the schema version the database had when opened (0: none)

    # -- the backend's part ------------------------------------------------------------------------------------------

    def _transaction(self, write: bool) -> contextlib.AbstractContextManager[Tx]:
        """A transaction (committed at the end, rolled back on an exception); ``write``: one that will write, taken
        with the lock that serializes writers where the database has no row locks."""
        raise NotImplementedError

    def _serialize(self, tx: Tx, what: str) -> None:
        """Wait for other connections doing ``what`` ("schema", "submit") to commit (no-op where writers are
        serialized anyway)."""

    def _changed(self, tx: Tx, job_ids: Sequence[str]) -> None:
        """Tell other replicas that these jobs changed, when the transaction commits (no-op where none listen)."""

    def close(self) -> None:
        raise NotImplementedError

    def ping(self) -> None:
        """Reach the database (``StoreUnavailable`` if it cannot be reached): for readiness checks."""
        with self._transaction(write=False) as tx:
            tx.one("SELECT 1")

    def _migrate(self) -> None:
        with self._transaction(write=True) as tx:
            self._serialize(tx, "schema")
            self.schema_found = migrate(tx, self.dialect)

    # -- the queue (workers) -----------------------------------------------------------------------------------------

    def submit(self, jobs: Sequence[NewJob], *, max_queued: int | None = None) -> None:
        """Insert ``jobs`` queued, all or none; ``QueueFull`` if more than ``max_queued`` would be waiting."""
        with self._transaction(write=True) as tx:
            if max_queued is not None:
                self._serialize(tx, "submit")
                queued = tx.one("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")[0]
                if queued + len(jobs) > max_queued:
                    raise QueueFull(queued, max_queued)
            for job in jobs:
                tx.run(
                    "INSERT INTO jobs (id, api, status, spec, created, n_images, batch_key, deadline, group_id, "
                    "inputs) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.api, json.dumps(job.spec), job.created, job.images, job.batch_key, job.deadline,
                     job.group_id, job.inputs),
                )  # fmt: skip
            self._changed(tx, [job.id for job in jobs])

    def claim(self, worker: str, room: int | Callable[[dict[str, Any]], int]) -> list[dict[str, Any]]:
        """Lease to ``worker`` the oldest queued job and the later queued jobs with its batch key, in arrival order,
        while their images fit in ``room`` (a number, or a function of the oldest job's record: the images a run of
        its size may have); the oldest job is always taken, even alone over ``room``. Jobs past their deadline are
        left for ``expire``. Returns their records (with ``inputs``), running, oldest first; [] if none is queued."""
        now = self.clock()
        with self._transaction(write=True) as tx:
            queued = "status = 'queued' AND (deadline IS NULL OR deadline >= ?)"
            head = tx.one(f"SELECT seq, {_SELECT} FROM jobs WHERE {queued} ORDER BY seq LIMIT 1{self._skip_locked}",
                          (now,))  # fmt: skip
            if head is None:
                return []
            first = _record(head[1:], [])
            left = (room(first) if callable(room) else room) - first["n_images"]
            ids, images = [first["id"]], first["n_images"]
            if first["batch_key"] is not None and left > 0:
                for job_id, n in tx.all(
                    f"SELECT id, n_images FROM jobs WHERE {queued} AND batch_key = ? AND seq > ? AND n_images <= ? "
                    f"ORDER BY seq LIMIT ?{self._skip_locked}", (now, first["batch_key"], head[0], left, left),
                ):  # fmt: skip
                    if n <= left:
                        ids.append(job_id)
                        left, images = left - n, images + n
            marks = ", ".join("?" * len(ids))
            tx.run(
                "UPDATE jobs SET status = 'running', worker = ?, lease_until = ?, attempts = attempts + 1, "
                f"started = ?, batch_size = ?, steps_done = 0 WHERE id IN ({marks})",
                (worker, now + self.lease_s, now, images, *ids),
            )
            rows = tx.all(f"SELECT {_SELECT}, inputs FROM jobs WHERE id IN ({marks}) ORDER BY seq", ids)
            self._changed(tx, ids)
            records = self._records(tx, [row[:-1] for row in rows])
        for record, row in zip(records, rows, strict=True):
            record["inputs"] = None if row[-1] is None else bytes(row[-1])
        return records

    def renew(self, worker: str, job_ids: Iterable[str]) -> Renewal:
        """Extend ``worker``'s lease on ``job_ids`` by ``lease_s`` from now, where it still holds it."""
        return self._touch(worker, {job_id: None for job_id in job_ids})

    def progress(self, worker: str, steps: Mapping[str, int]) -> Renewal:
        """Record the sampler steps done ({job id: step}) of the jobs ``worker`` holds, and renew their lease."""
        return self._touch(worker, dict(steps))

    def _touch(self, worker: str, steps: dict[str, int | None]) -> Renewal:
        now = self.clock()
        held, cancel = set(), {}
        with self._transaction(write=True) as tx:
            for job_id, step in sorted(steps.items()):  # rows locked in one order: no deadlock with another
                row = tx.one(
                    f"UPDATE jobs SET lease_until = ?, steps_done = COALESCE(?, steps_done) WHERE id = ? AND {_HELD} "
                    "RETURNING cancel_code, cancel_reason", (now + self.lease_s, step, job_id, worker, now),
                )  # fmt: skip
                if row is not None:
                    held.add(job_id)
                    if row[0] is not None:
                        cancel[job_id] = (row[0], row[1])
            self._changed(tx, sorted(job_id for job_id in held if steps[job_id] is not None))
        return Renewal(frozenset(held), cancel)

    def complete(self, worker: str, job_id: str, status: str, *, steps_done: int, error: str | None = None,
                 error_code: str | None = None, http_status: int | None = None,
                 images: Sequence[tuple[int, str, bytes]] = ()) -> bool:  # fmt: skip
        """Record the final ``status`` of a job and its ``images`` ((seed, parameters, PNG) each) if ``worker`` still
        holds its lease; False, and nothing recorded, if it does not (the job is another worker's now, or done)."""
        if status not in FINAL:
            raise ValueError(f"status={status!r} is not allowed; expected one of {', '.join(FINAL)}")

        def update(tx: Tx, now: float) -> bool:
            return 1 == tx.run(
                "UPDATE jobs SET status = ?, finished = ?, steps_done = ?, error = ?, error_code = ?, "
                f"http_status = ?, lease_until = NULL WHERE id = ? AND {_HELD}",
                (status, now, steps_done, error, error_code, http_status, job_id, worker, now),
            )

        return self._write_result(job_id, images, update)

    def _write_result(self, job_id: str, images: Sequence[tuple[int, str, bytes]],
                      update: Callable[[Tx, float], bool]) -> bool:  # fmt: skip
        """Run ``update`` (the final state; False: refused) and store ``images`` with it in one transaction; the
        files written for a refused result are removed."""
        rows, files = self._image_rows(job_id, images)
        done = False
        try:
            with self._transaction(write=True) as tx:
                done = update(tx, self.clock())
                if done:
                    for row in rows:
                        tx.run("INSERT INTO images (job_id, idx, seed, parameters, png, path) VALUES (?, ?, ?, ?, ?, "
                               "?)", row)  # fmt: skip
                    self._changed(tx, [job_id])
        finally:
            if not done:  # (a commit that failed after ``done`` may have been recorded: its files stay)
                for path in files:
                    path.unlink(missing_ok=True)
        return done

    def release(self, worker: str, job_ids: Iterable[str] | None = None) -> dict[str, str]:
        """Hand back jobs ``worker`` holds (all, or ``job_ids``) without running them: queued again with this claim
        not counted as an attempt (cancelled if a cancel was asked). Returns {job id: its status now}."""
        now = self.clock()
        with self._transaction(write=True) as tx:
            rows = tx.all(f"SELECT id, attempts, cancel_code, cancel_reason, deadline, created FROM jobs WHERE {_HELD} "
                          f"ORDER BY seq{self._skip_locked}", (worker, now))  # fmt: skip
            wanted = None if job_ids is None else set(job_ids)
            rows = [row for row in rows if wanted is None or row[0] in wanted]
            for row in rows:
                tx.run("UPDATE jobs SET attempts = attempts - 1 WHERE id = ?", (row[0],))
            changed = {row[0]: self._end_lease(tx, row, now, counted=False) for row in rows}
            self._changed(tx, list(changed))
        return changed

    def expire(self) -> dict[str, str]:
        """End the leases that ran out and the queued jobs past their deadline (any worker may call it, before each
        claim). A job whose lease ran out is cancelled if a cancel was asked, fails with 504 past its deadline, fails
        with 500 (``worker_lost``) after ``max_attempts`` claims, else is queued again. Returns {job id: status}."""
        now = self.clock()
        with self._transaction(write=True) as tx:
            rows = tx.all(
                "SELECT id, attempts, cancel_code, cancel_reason, deadline, created FROM jobs WHERE "
                f"status = 'running' AND lease_until <= ? ORDER BY seq{self._skip_locked}", (now,),
            )  # fmt: skip
            changed = {row[0]: self._end_lease(tx, row, now, counted=True) for row in rows}
            for job_id, deadline, created in tx.all(
                f"SELECT id, deadline, created FROM jobs WHERE status = 'queued' AND deadline < ? "
                f"ORDER BY seq{self._skip_locked}", (now,),
            ):  # fmt: skip
                _end(tx, job_id, now, "failed", _timeout(deadline - created), "timeout", 504)
                changed[job_id] = "failed"
            self._changed(tx, list(changed))
        return changed

    def _end_lease(self, tx: Tx, row: tuple[Any, ...], now: float, counted: bool) -> str:
        """The status a job takes when its lease ends unfinished (``row``: id, attempts, cancel code and reason,
        deadline, created)."""
        job_id, attempts, cancel_code, cancel_reason, deadline, created = row
        if cancel_code is not None:
            return _end(tx, job_id, now, "cancelled", cancel_reason, cancel_code, None)
        if deadline is not None and deadline < now:
            return _end(tx, job_id, now, "failed", _timeout(deadline - created), "timeout", 504)
        if counted and attempts >= self.max_attempts:
            message = (f"the job was started {attempts} times and each time its worker stopped before finishing it "
                       "(crashed, killed or cut off from the database); it is not tried again")  # fmt: skip
            return _end(tx, job_id, now, "failed", message, "worker_lost", 500)
        tx.run("UPDATE jobs SET status = 'queued', started = NULL, batch_size = NULL, steps_done = 0, worker = NULL, "
               "lease_until = NULL WHERE id = ?", (job_id,))  # fmt: skip
        return "queued"

    def cancel(self, job_id: str, *, reason: str = "cancelled by the client", code: str = "cancelled") -> str | None:
        """Cancel a job: "cancelled" (it was queued: ended now), "requested" (it is running: its worker is told at
        its next renewal and ends it), "finished" (nothing to do), None (no such job). ``cancel_step`` records the
        step it had reached."""
        now = self.clock()
        with self._transaction(write=True) as tx:
            end = "status = 'cancelled', finished = ?, error = ?, error_code = ?, cancel_step = steps_done"
            if tx.run(f"UPDATE jobs SET {end} WHERE id = ? AND status = 'queued'", (now, reason, code, job_id)):
                self._changed(tx, [job_id])
                return "cancelled"
            if tx.run("UPDATE jobs SET cancel_code = ?, cancel_reason = ?, cancel_step = steps_done WHERE id = ? AND "
                      "status = 'running' AND cancel_code IS NULL", (code, reason, job_id)):  # fmt: skip
                self._changed(tx, [job_id])
            row = tx.one("SELECT status FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else "requested" if row[0] == "running" else "finished"

    def fail_lost(self) -> int:
        """Fail every queued or running job (500, ``server_restarted``): what a single process does at start, when
        no one else can be running them. Returns how many."""
        now = self.clock()
        with self._transaction(write=True) as tx:
            return tx.run(
                "UPDATE jobs SET error = CASE status WHEN 'queued' THEN ? ELSE ? END, status = 'failed', finished = ?, "
                "error_code = 'server_restarted', http_status = 500, lease_until = NULL "
                "WHERE status IN ('queued', 'running')",
                (LOST.format(status="queued"), LOST.format(status="running"), now),
            )

    # -- reads (API) -------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's record (``spec`` decoded, ``images`` as [{index, seed, parameters}]), or None."""
        with self._transaction(write=False) as tx:
            row = tx.one(f"SELECT {_SELECT} FROM jobs WHERE id = ?", (job_id,))
            return None if row is None else self._records(tx, [row])[0]

    def find(self, job_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The records of those of ``job_ids`` that exist, by id (as ``get``, in one read)."""
        wanted = sorted(set(job_ids))
        if not wanted:
            return {}
        with self._transaction(write=False) as tx:
            rows = tx.all(f"SELECT {_SELECT} FROM jobs WHERE id IN ({', '.join('?' * len(wanted))})", wanted)
            return {record["id"]: record for record in self._records(tx, rows)}

    def ids(self, status: str, *, api: str | None = None, group_id: str | None = None) -> list[str]:
        """The ids of the jobs in ``status`` (of one API, of one request group), oldest first."""
        where, args = ["status = ?"], [status]
        for column, value in (("api", api), ("group_id", group_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        with self._transaction(write=False) as tx:
            return [row[0] for row in tx.all(f"SELECT id FROM jobs WHERE {' AND '.join(where)} ORDER BY seq", args)]

    def page(self, limit: int, offset: int, status: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Jobs newest first, ``limit`` from ``offset``, optionally of one status; and the total count."""
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        with self._transaction(write=False) as tx:
            total = tx.one(f"SELECT COUNT(*) FROM jobs {where}", args)[0]
            rows = tx.all(f"SELECT {_SELECT} FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                          (*args, limit, offset))  # fmt: skip
            return self._records(tx, rows), total

    def counts(self) -> dict[str, int]:
        """Jobs by status (every status, 0 if none): the queue-depth gauges."""
        with self._transaction(write=False) as tx:
            found = dict(tx.all("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
        return {status: found.get(status, 0) for status in STATUSES}

    def queued_images(self) -> int:
        """Images of the queued jobs (what the queue's Retry-After is estimated from)."""
        with self._transaction(write=False) as tx:
            return tx.one("SELECT COALESCE(SUM(n_images), 0) FROM jobs WHERE status = 'queued'")[0]

    def image(self, job_id: str, index: int) -> bytes | None:
        """A stored PNG, from the database or the images folder; None if the job has no such image."""
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT png, path FROM images WHERE job_id = ? AND idx = ?", (job_id, index))
        if row is None:
            return None
        if row[1] is None:
            return bytes(row[0])
        if self.images_dir is None:
            raise RuntimeError(f"image {index} of job {job_id!r} is the file {row[1]!r} of an images folder, and this "
                               "store was opened without one (images_dir)")  # fmt: skip
        return (self.images_dir / row[1]).read_bytes()

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _records(self, tx: Tx, rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        images: dict[str, list[tuple[Any, ...]]] = {row[0]: [] for row in rows}
        if rows:
            for job_id, *image in tx.all(
                f"SELECT job_id, idx, seed, parameters FROM images WHERE job_id IN ({', '.join('?' * len(rows))}) "
                "ORDER BY job_id, idx", list(images),
            ):  # fmt: skip
                images[job_id].append(tuple(image))
        return [_record(row, images[row[0]]) for row in rows]

    def _image_rows(self, job_id: str, images: Sequence[tuple[int, str, bytes]]) -> tuple[list[tuple], list[Path]]:
        """Rows of the images table; with ``images_dir``, the PNGs are written to new files first (names unique to
        this call, so that a worker whose result is refused removes only its own)."""
        if self.images_dir is None or not images:
            return [(job_id, i, seed, params, png, None) for i, (seed, params, png) in enumerate(images)], []
        if Path(job_id).name != job_id or job_id in ("", ".", ".."):
            raise ValueError(f"job_id={job_id!r} is not allowed as a folder name of the images folder")
        folder = self.images_dir / job_id
        folder.mkdir(parents=True, exist_ok=True)
        token, rows, files = uuid.uuid4().hex[:12], [], []
        try:
            for i, (seed, params, png) in enumerate(images):
                name = f"{job_id}/{token}-{i}.png"
                files += [self.images_dir / f"{name}.partial", self.images_dir / name]
                files[-2].write_bytes(png)
                os.replace(files[-2], files[-1])  # readers never see half a file
                rows.append((job_id, i, seed, params, None, name))
        except BaseException:
            for path in files:
                path.unlink(missing_ok=True)
            raise
        return rows, files


def _end(tx: Tx, job_id: str, now: float, status: str, error: str | None, code: str | None,
         http_status: int | None) -> str:  # fmt: skip
    tx.run("UPDATE jobs SET status = ?, finished = ?, error = ?, error_code = ?, http_status = ?, lease_until = NULL "
           "WHERE id = ?", (status, now, error, code, http_status, job_id))  # fmt: skip
    return status


def _timeout(seconds: float) -> str:
    return f"the job did not finish within the server's timeout of {seconds:g} s"


def _record(row: Sequence[Any], images: list[tuple[Any, ...]]) -> dict[str, Any]:
    record = dict(zip(_COLUMNS, row, strict=True))
    record["spec"] = json.loads(record["spec"])
    record["images"] = [{"index": i, "seed": seed, "parameters": params} for i, seed, params in images]
    return record
