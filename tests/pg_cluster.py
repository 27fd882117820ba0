"""A throwaway PostgreSQL cluster for tests: ``initdb`` into a temporary folder, a server listening only on a Unix
socket in that folder, stopped and removed at the end.

It uses the binaries of Debian's ``postgresql`` package (``initdb`` on PATH, else the newest
/usr/lib/postgresql/<version>/bin); ``.ci/run`` installs the package where it is missing. initdb refuses to run as
root, so as root the server runs as the ``postgres`` user the package creates (else ``nobody``).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

MISSING = ("PostgreSQL's initdb was not found (on PATH or in /usr/lib/postgresql/*/bin): the job store tests run "
           "against a throwaway PostgreSQL cluster; install Debian's package: apt-get install postgresql")  # fmt: skip
SUPERUSER = "unnoise"


def postgres_bin() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``; FileNotFoundError with ``MISSING`` if there is none."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)])  # fmt: skip
    if not candidates:
        raise FileNotFoundError(MISSING)
    return candidates[-1].parent


class PostgresCluster:
    """``start()`` / ``stop()`` (again and again: the data stays) / ``remove()``; ``url(db)`` and
    ``create_database(name)`` for clients. Trust authentication: only this machine's users can reach the socket."""

    def __init__(self, port: int = 5432):
        self.bin = postgres_bin()
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="unnoise-pg-"))  # short: a socket path has at most 107 bytes
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self._as_user: dict[str, object] = {}
        if os.geteuid() == 0:
            name = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(name)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self._as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([str(self.bin / tool), *args], cwd=self.dir, capture_output=True, text=True,
                                **self._as_user)  # fmt: skip
        if result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}\n{log}")

    def start(self) -> None:
        options = (f"-k {self.dir} -c listen_addresses='' -p {self.port} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")  # fmt: skip
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate, as pg_ctl's ``-m``)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def remove(self) -> None:
        """Stop the server if it runs and delete the cluster."""
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={quote(str(self.dir), safe='')}&port={self.port}"

    def create_database(self, name: str) -> str:
        """Create the database ``name`` (letters, digits, underscores); its URL."""
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"name={name!r} is not allowed; expected lower-case letters, digits and underscores")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def running_cluster() -> Iterator[PostgresCluster]:
    """For a test module's fixture (``yield from running_cluster()``): a started cluster, removed afterwards; without
    PostgreSQL the test fails instead of skipping, since CI installs it (.ci/run)."""
    import pytest

    try:
        cluster = PostgresCluster()
    except FileNotFoundError as error:
        pytest.fail(str(error))
    with cluster:
        yield cluster


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
