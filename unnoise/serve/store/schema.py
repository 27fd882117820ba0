"""The job store's schema, version by version, for each dialect; ``migrate`` brings a database up to date at open.

Version 1 is the schema of the single-process SQLite store (the ``jobs`` and ``images`` tables, created only where
missing, so that a database written before versions were recorded upgrades in place). Version 2 adds the shared
queue: the batch key, image count, deadline, request group and inputs of a job, its lease (worker, expiry,
attempts) and a cancel asked of a running job; an image may live in a file of the images folder instead of the
database. Both dialects go through the same versions, so a version number means the same tables everywhere.
"""

from __future__ import annotations

from typing import Any

_V1_SQLITE = (
    """CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, api TEXT NOT NULL, status TEXT NOT NULL,
        spec TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, steps_done INTEGER NOT NULL DEFAULT 0,
        batch_size INTEGER, error TEXT, error_code TEXT, http_status INTEGER, cancel_step INTEGER)""",
    """CREATE TABLE IF NOT EXISTS images (
        job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, seed INTEGER NOT NULL,
        parameters TEXT NOT NULL, png BLOB NOT NULL, PRIMARY KEY (job_id, idx))""",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status)",
)
_V1_POSTGRES = (
    """CREATE TABLE jobs (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT UNIQUE NOT NULL, api TEXT NOT NULL,
        status TEXT NOT NULL, spec TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, started DOUBLE PRECISION,
        finished DOUBLE PRECISION, steps_done INTEGER NOT NULL DEFAULT 0, batch_size INTEGER, error TEXT,
        error_code TEXT, http_status INTEGER, cancel_step INTEGER)""",
    """CREATE TABLE images (
        job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, seed BIGINT NOT NULL,
        parameters TEXT NOT NULL, png BYTEA NOT NULL, PRIMARY KEY (job_id, idx))""",
    "CREATE INDEX jobs_status ON jobs(status)",
)
# The queue's columns; ``{real}`` and ``{blob}`` are the dialect's float and bytes types.
_V2_COLUMNS = (
    "batch_key TEXT", "n_images INTEGER NOT NULL DEFAULT 1", "deadline {real}", "group_id TEXT", "inputs {blob}",
    "attempts INTEGER NOT NULL DEFAULT 0", "worker TEXT", "lease_until {real}", "cancel_code TEXT",
    "cancel_reason TEXT",
)  # fmt: skip
_V2_INDEX = "CREATE INDEX jobs_queue ON jobs(status, batch_key, seq)"
_V2_SQLITE = (
    *(f"ALTER TABLE jobs ADD COLUMN {c.format(real='REAL', blob='BLOB')}" for c in _V2_COLUMNS),
    _V2_INDEX,
    # SQLite cannot drop a NOT NULL: the images table is rebuilt with ``png`` optional and ``path`` beside it
    """CREATE TABLE images_v2 (
        job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, seed INTEGER NOT NULL,
        parameters TEXT NOT NULL, png BLOB, path TEXT, PRIMARY KEY (job_id, idx),
        CHECK ((png IS NULL) <> (path IS NULL)))""",
    "INSERT INTO images_v2 (job_id, idx, seed, parameters, png) SELECT job_id, idx, seed, parameters, png FROM images",
    "DROP TABLE images",
    "ALTER TABLE images_v2 RENAME TO images",
)
_V2_POSTGRES = (
    "ALTER TABLE jobs "
    + ", ".join(f"ADD COLUMN {c.format(real='DOUBLE PRECISION', blob='BYTEA')}" for c in _V2_COLUMNS),
    _V2_INDEX,
    "ALTER TABLE images ALTER COLUMN png DROP NOT NULL, ADD COLUMN path TEXT, "
    "ADD CONSTRAINT images_one_place CHECK ((png IS NULL) <> (path IS NULL))",
)
# MIGRATIONS[dialect][v - 1]: the statements that bring version v - 1 to v.
MIGRATIONS = {"sqlite": (_V1_SQLITE, _V2_SQLITE), "postgresql": (_V1_POSTGRES, _V2_POSTGRES)}
VERSION = 2


def migrate(tx: Any, dialect: str) -> int:
    """Apply the versions the database lacks, in the caller's write transaction (which serializes concurrent
    openers); returns the version found. A database newer than this code is refused: its columns may mean things
    this code would get wrong."""
    tx.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = tx.one("SELECT version FROM schema_version")
    found = 0 if row is None else row[0]
    if found > VERSION:
        raise RuntimeError(f"the job store's schema is version {found}, newer than this unnoise knows ({VERSION}); "
                           "upgrade unnoise or open another database")  # fmt: skip
    for statements in MIGRATIONS[dialect][found:]:
        for statement in statements:
            tx.run(statement)
    if row is None:
        tx.run("INSERT INTO schema_version (version) VALUES (?)", (VERSION,))
    elif found < VERSION:
        tx.run("UPDATE schema_version SET version = ?", (VERSION,))
    return found
