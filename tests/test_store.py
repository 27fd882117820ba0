"""The job store's contract, one suite over both backends (SQLite and a throwaway PostgreSQL cluster): submit, claim
with batching and row locks, leases (renewal, expiry, attempts), completion only under a held lease, progress,
cancel, release, paging, images, reopening, schema versions. Time is a test clock: no test waits for a lease."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
from pg_cluster import running_cluster

from unnoise.pipeline.hires import Hires
from unnoise.serve.store import (
    LOST,
    SCHEMA_VERSION,
    NewJob,
    QueueFull,
    SqliteStore,
    Store,
    StoreUnavailable,
    batch_key_digest,
    open_store,
)

LEASE = 10.0
T0 = 1_000_000.0


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def postgres_cluster():
    """One cluster for this module's tests, each of which creates its own database."""
    yield from running_cluster()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """The location of a fresh database of the backend."""
    if request.param == "sqlite":
        return tmp_path / "jobs.sqlite3"
    return request.getfixturevalue("postgres_cluster").create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def opener(backend, clock):
    """``open(**options)``: a store (a connection of its own) on this test's database, with the test clock and
    ``LEASE``; closed at the end."""
    stores: list[Store] = []

    def open_(**options) -> Store:
        store = open_store(backend, **{"clock": clock, "lease_s": LEASE, **options})
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()


def job(i: int, key: str | None = "a", images: int = 1, **fields) -> NewJob:
    spec = {"prompt": f"prompt {i}", "n": images, "steps": 4}
    return NewJob(f"j{i}", "jobs", spec, T0 + i, images=images, batch_key=key, **fields)


def ids(records) -> list[str]:
    return [r["id"] for r in records]


# -- submit ---------------------------------------------------------------------------------------------------------


def test_submit_stores_queued_jobs(opener):
    store = opener()
    store.submit([job(0, inputs=b"\x00image"), job(1, key=None, images=3, deadline=T0 + 60, group_id="g")])
    record = store.get("j1")
    assert record == {
        "id": "j1", "api": "jobs", "status": "queued", "spec": {"prompt": "prompt 1", "n": 3, "steps": 4},
        "created": T0 + 1, "started": None, "finished": None, "steps_done": 0, "batch_size": None, "error": None,
        "error_code": None, "http_status": None, "cancel_step": None, "attempts": 0, "worker": None,
        "lease_until": None, "deadline": T0 + 60, "group_id": "g", "batch_key": None, "n_images": 3, "images": [],
    }  # fmt: skip
    assert store.get("missing") is None
    assert store.counts() == {"queued": 2, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert store.queued_images() == 4
    assert store.claim("w", 1)[0]["inputs"] == b"\x00image"
    assert store.queued_images() == 3 and store.counts()["running"] == 1
    store.claim("w", 8)
    assert store.queued_images() == 0


def test_submit_is_all_or_none_under_the_queue_cap(opener):
    store = opener()
    store.submit([job(0), job(1)], max_queued=3)
    with pytest.raises(QueueFull, match=r"the queue is full \(2 of 3 jobs waiting\)") as error:
        store.submit([job(2), job(3)], max_queued=3)
    assert (error.value.queued, error.value.limit) == (2, 3)
    assert store.get("j2") is None and store.counts()["queued"] == 2
    store.claim("w", 1)  # running jobs are not waiting: room for two more
    store.submit([job(2), job(3)], max_queued=3)
    assert store.counts()["queued"] == 3


# -- claim ----------------------------------------------------------------------------------------------------------


def test_claim_takes_the_oldest_job_and_the_compatible_ones_that_fit(opener, clock):
    store = opener()
    store.submit([job(0, "a"), job(1, "b"), job(2, "a", 2), job(3, "a", 3), job(4, "a"), job(5, None), job(6, None)])
    batch = store.claim("w1", 4)  # j0 (1 image), j2 (2), not j3 (3 > 1 left), j4 (1)
    assert ids(batch) == ["j0", "j2", "j4"]
    for record in batch:
        assert record["status"] == "running" and record["worker"] == "w1" and record["attempts"] == 1
        assert record["started"] == T0 and record["lease_until"] == T0 + LEASE and record["batch_size"] == 4
    assert store.get("j2") == {key: value for key, value in batch[1].items() if key != "inputs"}
    seen = []
    assert ids(store.claim("w1", lambda head: seen.append(head["id"]) or 4)) == ["j1"]  # no other "b"
    assert seen == ["j1"]
    assert ids(store.claim("w1", 2)) == ["j3"]  # the oldest job runs even alone over the room
    assert store.get("j3")["batch_size"] == 3
    assert ids(store.claim("w1", 8)) == ["j5"]  # no batch key: alone
    assert ids(store.claim("w1", 8)) == ["j6"]
    assert store.claim("w1", 8) == []
    assert store.counts()["running"] == 7


def test_a_job_past_its_deadline_is_never_claimed_and_expires(opener, clock):
    store = opener()
    store.submit([job(0, deadline=T0 + 5), job(1)])
    clock.advance(6)
    assert ids(store.claim("w", 8)) == ["j1"]
    assert store.expire() == {"j0": "failed"}
    record = store.get("j0")
    assert (record["status"], record["error_code"], record["http_status"]) == ("failed", "timeout", 504)
    assert record["error"] == "the job did not finish within the server's timeout of 5 s"
    assert record["finished"] == T0 + 6


def test_two_claimers_never_take_the_same_job(opener):
    """Four threads on two connections claim until the queue is empty: every job is taken exactly once."""
    first, second = opener(), opener()
    jobs = [job(i, key="abc"[i % 3], images=1 + i % 2) for i in range(40)]
    first.submit(jobs)
    taken: list[tuple[str, str]] = []
    start = threading.Barrier(4)

    def claimer(store: Store, worker: str) -> None:
        start.wait()
        while batch := store.claim(worker, 3):
            taken.extend((record["id"], worker) for record in batch)

    threads = [threading.Thread(target=claimer, args=(store, f"w{i}")) for i, store in enumerate([first, second] * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(job_id for job_id, _ in taken) == sorted(j.id for j in jobs)
    for job_id, worker in taken:
        record = first.get(job_id)
        assert record["worker"] == worker and record["attempts"] == 1


def test_a_claim_passes_over_the_rows_another_claim_holds(opener):
    """While one claim's transaction holds the oldest job, a second claim takes the next one: in PostgreSQL at once
    (SKIP LOCKED, without waiting for the first to commit), in SQLite once the first commits (one writer)."""
    first, second = opener(), opener()
    first.submit([job(0, "a"), job(1, "b")])
    result: dict[str, list] = {}
    other = threading.Thread(target=lambda: result.update(second=ids(second.claim("w2", 8))))

    def room(head):  # runs inside the first claim's transaction, its row locked
        other.start()
        if first.dialect == "postgresql":  # the second claim must not wait for this transaction
            other.join(60)
            assert result == {"second": ["j1"]}
        return 8

    assert ids(first.claim("w1", room)) == ["j0"]
    other.join(60)
    assert result == {"second": ["j1"]}


# -- leases ---------------------------------------------------------------------------------------------------------


def test_renewal_extends_the_lease(opener, clock):
    store = opener()
    store.submit([job(0), job(1, "b")])
    store.claim("w1", 1)
    clock.advance(LEASE - 1)
    assert store.renew("w1", ["j0", "j1", "missing"]).held == {"j0"}  # j1 is queued, not held
    assert store.renew("w2", ["j0"]).held == frozenset()  # not w2's
    assert store.get("j0")["lease_until"] == T0 + 2 * LEASE - 1
    clock.advance(LEASE - 1)  # past the first lease, within the renewed one
    assert store.expire() == {}
    assert store.complete("w1", "j0", "succeeded", steps_done=4)
    assert store.get("j0")["status"] == "succeeded" and store.get("j0")["lease_until"] is None


def test_an_expired_lease_requeues_the_job_and_counts_the_attempt(opener, clock):
    store = opener()
    store.submit([job(0)])
    store.claim("w1", 1)
    store.progress("w1", {"j0": 2})
    clock.advance(LEASE)  # a lease ends at its instant
    assert store.renew("w1", ["j0"]).held == frozenset()  # too late: lost
    assert store.expire() == {"j0": "queued"}
    record = store.get("j0")
    assert (record["status"], record["worker"], record["lease_until"], record["attempts"]) == ("queued", None, None, 1)
    assert (record["started"], record["steps_done"], record["batch_size"]) == (None, 0, None)
    [again] = store.claim("w2", 1)
    assert (again["worker"], again["attempts"], again["started"]) == ("w2", 2, T0 + LEASE)


def test_a_job_that_keeps_losing_its_worker_fails_after_max_attempts(opener, clock):
    store = opener(max_attempts=2)
    store.submit([job(0)])
    for expected in ("queued", "failed"):
        assert ids(store.claim("w", 1)) == ["j0"]
        clock.advance(LEASE)
        assert store.expire() == {"j0": expected}
    record = store.get("j0")
    assert (record["error_code"], record["http_status"], record["attempts"]) == ("worker_lost", 500, 2)
    assert record["error"].startswith("the job was started 2 times and each time its worker stopped")
    assert store.claim("w", 1) == []


def test_a_running_job_past_its_deadline_fails_when_its_lease_expires(opener, clock):
    store = opener()
    store.submit([job(0, deadline=T0 + LEASE / 2)])
    store.claim("w", 1)
    clock.advance(LEASE)
    assert store.expire() == {"j0": "failed"}
    assert store.get("j0")["error_code"] == "timeout"


def test_only_the_lease_holder_completes_once(opener, clock):
    store = opener()
    store.submit([job(0)])
    store.claim("w1", 1)
    clock.advance(LEASE)  # w1's lease ran out (nobody has expired it yet)
    assert not store.complete("w1", "j0", "succeeded", steps_done=4, images=[(0, "late", b"png w1")])
    assert store.expire() == {"j0": "queued"}
    store.claim("w2", 1)
    assert not store.complete("w1", "j0", "failed", steps_done=1, error="boom")  # w2 holds it now
    assert store.complete("w2", "j0", "succeeded", steps_done=4, images=[(7, "p", b"png w2")])
    assert not store.complete("w2", "j0", "failed", steps_done=4)  # one result per job
    record = store.get("j0")
    assert (record["status"], record["error"], record["steps_done"]) == ("succeeded", None, 4)
    assert record["images"] == [{"index": 0, "seed": 7, "parameters": "p"}] and store.image("j0", 0) == b"png w2"
    with pytest.raises(ValueError, match="status='running' is not allowed"):
        store.complete("w2", "j0", "running", steps_done=0)


def test_progress_is_recorded_for_the_lease_holder_only(opener, clock):
    store = opener()
    store.submit([job(0), job(1)])
    store.claim("w1", 2)
    assert store.progress("w1", {"j0": 2, "j1": 3}).held == {"j0", "j1"}
    assert store.progress("w2", {"j0": 4}).held == frozenset()
    assert [store.get(j)["steps_done"] for j in ("j0", "j1")] == [2, 3]
    clock.advance(LEASE - 1)
    store.progress("w1", {"j0": 3})  # renews j0 only
    clock.advance(2)
    assert store.expire() == {"j1": "queued"}


def test_release_hands_jobs_back_without_counting_an_attempt(opener, clock):
    store = opener()
    store.submit([job(0), job(1), job(2)])
    store.claim("w", 3)
    assert store.release("w", ["j1"]) == {"j1": "queued"}
    assert (store.get("j1")["attempts"], store.get("j0")["status"]) == (0, "running")
    assert store.cancel("j2") == "requested"
    assert store.release("other") == {}
    assert store.release("w") == {"j0": "queued", "j2": "cancelled"}
    assert store.get("j0")["attempts"] == 0 and ids(store.claim("w", 3)) == ["j0", "j1"]


# -- cancel ---------------------------------------------------------------------------------------------------------


def test_cancel_ends_a_queued_job_at_once(opener, clock):
    store = opener()
    store.submit([job(0), job(1)])
    clock.advance(1)
    assert store.cancel("j0") == "cancelled"
    record = store.get("j0")
    assert (record["status"], record["error"], record["error_code"]) == ("cancelled", "cancelled by the client",
                                                                         "cancelled")  # fmt: skip
    assert (record["cancel_step"], record["finished"], record["http_status"]) == (0, T0 + 1, None)
    assert ids(store.claim("w", 8)) == ["j1"]
    assert store.cancel("j0") == "finished" and store.cancel("missing") is None
    store.submit([job(2)])
    assert store.cancel("j2", reason="interrupted by the client", code="interrupted") == "cancelled"
    assert store.get("j2")["error_code"] == "interrupted"


def test_cancel_flags_a_running_job_for_its_worker(opener, clock):
    store = opener()
    store.submit([job(0), job(1)])
    store.claim("w", 2)
    store.progress("w", {"j0": 3})
    assert store.cancel("j0") == "requested"
    assert store.get("j0")["status"] == "running" and store.get("j0")["cancel_step"] == 3
    store.progress("w", {"j0": 4})
    assert store.cancel("j0") == "requested"  # asked once: the step of the first ask stays
    renewal = store.renew("w", ["j0", "j1"])
    assert renewal.held == {"j0", "j1"} and renewal.cancel == {"j0": ("cancelled", "cancelled by the client")}
    assert store.complete("w", "j0", "cancelled", steps_done=4, error="cancelled by the client", error_code="cancelled")
    record = store.get("j0")
    assert (record["status"], record["cancel_step"], record["steps_done"]) == ("cancelled", 3, 4)
    assert store.cancel("j0") == "finished"


def test_a_cancelled_job_whose_worker_died_ends_cancelled(opener, clock):
    store = opener()
    store.submit([job(0)])
    store.claim("w", 1)
    store.cancel("j0", reason="skipped by the client", code="skipped")
    clock.advance(LEASE)
    assert store.expire() == {"j0": "cancelled"}
    record = store.get("j0")
    assert (record["status"], record["error"], record["error_code"]) == ("cancelled", "skipped by the client",
                                                                         "skipped")  # fmt: skip


# -- the API's reads ------------------------------------------------------------------------------------------------


def test_page_lists_jobs_newest_first(opener):
    store = opener()
    store.submit([NewJob(f"j{i}", "jobs", {"n": 1}, T0 - i) for i in range(5)])  # arrival order, not ``created``
    for batch in (store.claim("w", 1), store.claim("w", 1)):
        store.complete("w", batch[0]["id"], "succeeded", steps_done=1, images=[(1, "p", b"png")])
    page, total = store.page(limit=2, offset=0)
    assert total == 5 and ids(page) == ["j4", "j3"]
    assert ids(store.page(2, 2)[0]) == ["j2", "j1"] and ids(store.page(2, 4)[0]) == ["j0"]
    assert store.page(2, 6) == ([], 5)
    done, total = store.page(10, 0, "succeeded")
    assert total == 2 and ids(done) == ["j1", "j0"] and done[0]["images"] == [{"index": 0, "seed": 1,
                                                                               "parameters": "p"}]  # fmt: skip
    assert store.page(10, 0, "queued") == (store.page(10, 0)[0][:3], 3)


def test_find_and_ids_read_several_jobs(opener):
    """What the server reads for several jobs at once: their records (the jobs it follows) and the ids of a status,
    of one API or of one request group (AUTOMATIC1111's interrupt)."""
    store = opener()
    store.submit([job(0, group_id="g"), job(1, group_id="g"), job(2)])
    found = store.find(["j2", "j0", "missing", "j0"])
    assert found == {"j0": store.get("j0"), "j2": store.get("j2")} and store.find([]) == {}
    assert store.ids("queued") == ["j0", "j1", "j2"] and store.ids("queued", group_id="g") == ["j0", "j1"]
    assert store.ids("queued", api="jobs", group_id="g") == ["j0", "j1"] and store.ids("queued", api="openai") == []
    store.claim("w", 1)
    assert store.ids("running") == ["j0"] and store.ids("queued", group_id="g") == ["j1"]


@pytest.mark.parametrize("in_files", [False, True], ids=["database", "folder"])
def test_images_are_stored_in_the_database_or_a_folder(opener, tmp_path, in_files):
    folder = tmp_path / "images" if in_files else None
    store = opener(images_dir=folder)
    store.submit([job(0), job(1)])
    store.claim("w1", 2)
    pngs = [b"\x89PNG first", b"\x89PNG second"]
    assert store.complete("w1", "j0", "succeeded", steps_done=4, images=[(5, "a", pngs[0]), (6, "b", pngs[1])])
    assert [store.image("j0", i) for i in range(3)] == [*pngs, None]
    assert store.get("j0")["images"] == [{"index": 0, "seed": 5, "parameters": "a"},
                                         {"index": 1, "seed": 6, "parameters": "b"}]  # fmt: skip
    if in_files:
        files = sorted((folder / "j0").iterdir())
        assert [f.read_bytes() for f in files] == pngs and all(f.suffix == ".png" for f in files)
        assert not store.complete("w2", "j1", "succeeded", steps_done=4, images=[(7, "c", b"refused")])
        assert not (folder / "j1").exists() or not any((folder / "j1").iterdir())  # a refused result leaves no file
        with pytest.raises(RuntimeError, match=r"image 0 of job 'j0' is the file .* store was opened without one"):
            opener().image("j0", 0)
    else:
        assert not any(tmp_path.glob("images*"))


# -- reopening and the schema ---------------------------------------------------------------------------------------


def test_reopening_keeps_the_queue_and_leases(opener, clock):
    store = opener()
    assert store.schema_found == 0
    store.submit([job(0), job(1, "b"), job(2, "c")])
    store.claim("w1", 1)
    store.close()  # the process dies holding j0

    store = opener()
    assert store.schema_found == SCHEMA_VERSION
    assert [store.get(j)["status"] for j in ("j0", "j1", "j2")] == ["running", "queued", "queued"]
    assert ids(store.claim("w2", 1)) == ["j1"]  # j0 is still leased
    clock.advance(LEASE)
    assert store.expire() == {"j0": "queued", "j1": "queued"}
    assert [(r["id"], r["attempts"]) for r in store.claim("w2", 1)] == [("j0", 2)]


def test_fail_lost_ends_what_a_single_process_left_unfinished(opener):
    store = opener()
    store.submit([job(0), job(1), job(2)])
    store.claim("w", 1)
    store.complete("w", "j0", "succeeded", steps_done=4)
    store.claim("w", 1)
    assert store.fail_lost() == 2
    for job_id, status in (("j1", "running"), ("j2", "queued")):
        record = store.get(job_id)
        assert (record["status"], record["error_code"], record["http_status"]) == ("failed", "server_restarted", 500)
        assert record["error"] == LOST.format(status=status)
    assert store.get("j0")["status"] == "succeeded"


def test_a_newer_schema_is_refused(opener):
    store = opener()
    with store._transaction(write=True) as tx:  # as a newer unnoise would leave it
        tx.run("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match=f"schema is version {SCHEMA_VERSION + 1}, newer than this unnoise knows"):
        opener()


# The schema of the single-process store before versions were recorded (unnoise/serve/store.py until 2026-12).
LEGACY_SCHEMA = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, api TEXT NOT NULL,
    status TEXT NOT NULL, spec TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL,
    steps_done INTEGER NOT NULL DEFAULT 0, batch_size INTEGER, error TEXT, error_code TEXT, http_status INTEGER,
    cancel_step INTEGER);
CREATE TABLE images (job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, seed INTEGER NOT NULL,
    parameters TEXT NOT NULL, png BLOB NOT NULL, PRIMARY KEY (job_id, idx));
CREATE INDEX jobs_status ON jobs(status);
INSERT INTO jobs (id, api, status, spec, created, finished, steps_done, batch_size)
    VALUES ('done', 'openai', 'succeeded', '{"n": 1}', 1.5, 2.5, 4, 1),
           ('waiting', 'jobs', 'queued', '{"n": 2}', 3, NULL, 0, NULL);
INSERT INTO images VALUES ('done', 0, 42, 'a cat\nSteps: 4', X'89504E47');
"""


def test_a_database_from_before_schema_versions_is_upgraded_in_place(tmp_path, clock):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(LEGACY_SCHEMA)
    store = SqliteStore(path, clock=clock)
    try:
        assert store.schema_found == 0 and store.fail_lost() == 1
        record = store.get("done")
        assert (record["status"], record["created"], record["n_images"], record["attempts"]) == ("succeeded", 1.5,
                                                                                                 1, 0)  # fmt: skip
        assert record["images"] == [{"index": 0, "seed": 42, "parameters": "a cat\nSteps: 4"}]
        assert store.image("done", 0) == b"\x89PNG" and store.get("waiting")["error_code"] == "server_restarted"
        store.submit([job(0)])
        assert ids(store.claim("w", 1)) == ["j0"]
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


# -- the backends ---------------------------------------------------------------------------------------------------


def test_open_store_picks_the_backend_from_the_location(backend, clock):
    store = open_store(backend, clock=clock)
    try:
        assert store.dialect == ("sqlite" if isinstance(backend, Path) else "postgresql")
        assert isinstance(store, SqliteStore) == isinstance(backend, Path)
    finally:
        store.close()


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"lease_s=0 is not allowed; expected a number of seconds > 0"):
        SqliteStore(tmp_path / "a.sqlite3", lease_s=0)
    with pytest.raises(ValueError, match=r"max_attempts=0 is not allowed; expected an integer >= 1"):
        SqliteStore(tmp_path / "a.sqlite3", max_attempts=0)


def test_postgres_outage_raises_store_unavailable_then_reconnects(postgres_cluster, clock):
    """A lost connection fails the call in flight with StoreUnavailable; the next call connects again."""
    import psycopg

    url = postgres_cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")
    store = open_store(url, clock=clock)
    try:
        store.submit([job(0)])
        with psycopg.connect(url, autocommit=True) as admin:  # as a database restart would cut it
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")  # fmt: skip
        with pytest.raises(StoreUnavailable, match="the job store's database connection was lost"):
            store.get("j0")
        assert store.get("j0")["status"] == "queued"
    finally:
        store.close()
    missing = postgres_cluster.url("db").replace(f"port={postgres_cluster.port}", "port=1")
    with pytest.raises(StoreUnavailable, match="the job store's database cannot be reached"):
        open_store(missing, clock=clock)


def test_serve_names_an_unreachable_store_in_one_error(capsys):
    """`unnoise serve --store URL` whose database cannot be reached exits 2 naming the flag, before uvicorn starts
    (whose failed startup would print a traceback)."""
    import argparse

    from unnoise.serve.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--store", "postgresql://unnoise@127.0.0.1:1/jobs", "--no-warmup"])
    with pytest.raises(SystemExit) as exited:
        args.run(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "argument --store: the job store's database cannot be reached" in err and "Traceback" not in err


def test_batch_key_digest_tells_batch_keys_apart():
    key = (512, 512, 20, "euler", "leading", 7.5, 0.0, None, False, False, None, (("style", 0.8),), Hires(), 1, None)
    same = (512, 512, 20, "euler", "leading", 7.5, 0.0, None, False, False, None, (("style", 0.8),), Hires(), 1, None)
    assert batch_key_digest(key) == batch_key_digest(same) and len(batch_key_digest(key)) == 64
    for changed in (7.500000000000001, 7):
        other = (*key[:5], changed, *key[6:])
        assert batch_key_digest(other) != batch_key_digest(key)
    assert batch_key_digest((*key[:12], Hires(scale=1.5), *key[13:])) != batch_key_digest(key)


def test_postgres_tells_listeners_which_jobs_changed(postgres_cluster, clock):
    """Every change a client can see (submit, claim, progress, cancel, completion, expiry) is announced with NOTIFY
    to the listeners of every replica; a lease renewal or a refused completion is not (notifications come in commit
    order, so one sent by mistake would show up before the next expected one)."""
    url = postgres_cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")
    store, other = open_store(url, clock=clock, lease_s=LEASE), open_store(url, clock=clock, lease_s=LEASE)
    changes = other.listen()

    def collect(expected: set[str]) -> set[str]:  # notifications of several transactions may come apart
        got: set[str] = set()
        while not expected <= got and (new := changes.wait(30)):
            got |= new
        return got

    try:
        assert changes.wait(0.01) == set()
        store.submit([job(0), job(1), job(2, "b")])
        assert collect({"j0", "j1", "j2"}) == {"j0", "j1", "j2"}
        store.claim("w", 2)
        assert collect({"j0", "j1"}) == {"j0", "j1"}
        store.renew("w", ["j0", "j1"])
        store.progress("w", {"j1": 2})
        store.cancel("j2")
        assert collect({"j1", "j2"}) == {"j1", "j2"}
        store.complete("w", "j0", "succeeded", steps_done=4)
        assert collect({"j0"}) == {"j0"}
        clock.advance(LEASE)
        store.expire()
        assert collect({"j1"}) == {"j1"}
        assert not store.complete("w", "j1", "succeeded", steps_done=4)  # refused: nothing changed
        store.ping()
        store.submit([job(3)])  # announced after anything sent before it
        assert collect({"j3"}) == {"j3"}
    finally:
        changes.close()
        store.close()
        other.close()
