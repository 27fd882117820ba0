"""The job store in PostgreSQL (psycopg 3): one queue shared by every replica of ``unnoise serve``.

A claim locks its rows with ``SELECT ... FOR UPDATE SKIP LOCKED``: two replicas claiming at once take different
jobs and neither waits for the other. Opening and capped submits take a transaction-scoped advisory lock, so that
replicas starting together migrate the schema once and the queue's cap holds across them. One connection per
store, shared by its threads behind a lock; a lost connection raises ``StoreUnavailable`` and the next call
connects again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from unnoise.serve.store.base import Store, StoreUnavailable, Tx

CHANNEL = "unnoise_jobs"  # NOTIFY channel: the payload is the id of a job that changed
# pg_advisory_xact_lock keys (any bigint; these spell "unnoise" and a number)
_LOCKS = {"schema": 0x756E6E6F697365_01, "submit": 0x756E6E6F697365_02}


class PostgresStore(Store):
    """``Store`` in the PostgreSQL database at ``url`` (``postgresql://user@host/db`` or a libpq conninfo string);
    options as ``Store``'s. ``StoreUnavailable`` if it cannot be reached."""

    dialect = "postgresql"
    _skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, *, connect_timeout: int = 5, **options: Any):
        try:
            import psycopg
        except ImportError as error:
            raise ImportError("the PostgreSQL job store needs psycopg 3: pip install 'unnoise[postgres]'") from error
        super().__init__(**options)
        self._psycopg, self.url, self.connect_timeout = psycopg, url, connect_timeout
        self._conn: Any = None
        self._migrate()

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout)
            except self._psycopg.OperationalError as error:
                raise StoreUnavailable(f"the job store's database cannot be reached: {error}") from error
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    if not write:  # one snapshot for a read's several statements (a page and its count)
                        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    yield Tx(conn, "%s")
            except self._psycopg.OperationalError as error:
                if not (conn.broken or conn.closed):
                    raise
                conn.close()
                self._conn = None
                raise StoreUnavailable(f"the job store's database connection was lost: {error}") from error

    def _serialize(self, tx: Tx, what: str) -> None:
        tx.all("SELECT pg_advisory_xact_lock(?)", (_LOCKS[what],))

    def _changed(self, tx: Tx, job_ids: Sequence[str]) -> None:
        if job_ids:  # delivered at commit, once per job id however often it is sent in the transaction
            tx.all("SELECT pg_notify(?, job_id) FROM unnest(?::text[]) AS job_id", (CHANNEL, list(job_ids)))

    def listen(self) -> JobChanges:
        """The ids of the jobs that change from now on, whichever replica changes them (a connection of its own)."""
        try:
            return JobChanges(self._psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout),
                              self._psycopg)  # fmt: skip
        except self._psycopg.OperationalError as error:
            raise StoreUnavailable(f"the job store's database cannot be reached: {error}") from error

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class JobChanges:
    """``wait(timeout)``: the ids of jobs changed since the last call (``PostgresStore.listen``), to push a job's
    progress to its clients from whichever replica runs it. ``close()`` when done."""

    def __init__(self, conn: Any, psycopg: Any):
        self._conn, self._psycopg = conn, psycopg
        conn.execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> set[str]:
        """The jobs changed since the last call: at once if any, else the first to change within ``timeout``
        seconds (an empty set if none); ``StoreUnavailable`` if the connection is lost."""
        try:
            changed = {n.payload for n in self._conn.notifies(timeout=0)}
            if not changed:
                changed = {n.payload for n in self._conn.notifies(timeout=timeout, stop_after=1)}
                changed |= {n.payload for n in self._conn.notifies(timeout=0)}
        except self._psycopg.OperationalError as error:
            raise StoreUnavailable(f"the job store's database connection was lost: {error}") from error
        return changed

    def close(self) -> None:
        self._conn.close()
