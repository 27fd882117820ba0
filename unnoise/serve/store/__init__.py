"""Jobs, their images and the queue they wait in: ``Store`` (the contract, ``base``) in SQLite (``SqliteStore``, the
default: one machine) or PostgreSQL (``PostgresStore``: several replicas); ``open_store`` picks a backend from a path
or URL. See docs/serving.md, "Job store"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unnoise.serve.store.base import (
    ACTIVE,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_ATTEMPTS,
    FINAL,
    LOST,
    STATUSES,
    NewJob,
    QueueFull,
    Renewal,
    Store,
    StoreUnavailable,
    batch_key_digest,
)  # fmt: skip
from unnoise.serve.store.schema import VERSION as SCHEMA_VERSION
from unnoise.serve.store.sqlite import SqliteStore

__all__ = [
    "ACTIVE", "DEFAULT_LEASE_S", "DEFAULT_MAX_ATTEMPTS", "FINAL", "LOST", "POSTGRES_SCHEMES", "SCHEMA_VERSION",
    "STATUSES", "NewJob", "QueueFull", "Renewal", "SqliteStore", "Store", "StoreUnavailable", "batch_key_digest",
    "open_store",
]  # fmt: skip
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(location: str | Path, **options: Any) -> Store:
    """The store at ``location``: a ``postgresql://`` (or ``postgres://``) URL opens ``PostgresStore``, anything
    else is a SQLite file; ``options`` as ``Store``'s (``images_dir``, ``lease_s``, ``max_attempts``, ``clock``)."""
    if isinstance(location, str) and location.startswith(POSTGRES_SCHEMES):
        from unnoise.serve.store.postgres import PostgresStore  # psycopg only when asked for

        return PostgresStore(location, **options)
    return SqliteStore(location, **options)
